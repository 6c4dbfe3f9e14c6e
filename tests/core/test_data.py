import numpy as np
import pytest

from fedjax_sim.core.data import DataError, FederatedData
from tests.conftest import packed_dataset


def test_gather_pads_with_mask_and_keeps_real_examples():
  data = packed_dataset([3, 0, 5])
  ex, mask = data.gather([2, 0, 1], pad_to=8)
  assert ex["x"].shape == (3, 8, 5) and mask.shape == (3, 8)
  np.testing.assert_array_equal(mask.sum(1), [5, 3, 0])
  np.testing.assert_array_equal(ex["x"][0, :5], data.client(2)["x"])
  np.testing.assert_array_equal(ex["x"][1, :3], data.client(0)["x"])
  # Padded slots repeat a real example (finite), never garbage.
  np.testing.assert_array_equal(ex["x"][1, 3:], np.repeat(data.client(0)["x"][-1:], 5, 0))


def test_gather_truncates_to_pad_to():
  data = packed_dataset([10])
  ex, mask = data.gather([0], pad_to=4)
  assert mask.all()
  np.testing.assert_array_equal(ex["y"][0], data.client(0)["y"][:4])


def test_split_examples_is_a_partition_per_client():
  data = packed_dataset([10, 1, 4])
  train, test = data.split_examples(0.25)
  np.testing.assert_array_equal(train.sizes + test.sizes, data.sizes)
  np.testing.assert_array_equal(test.sizes, [3, 0, 1])
  both = np.concatenate([train.client(0)["x"], test.client(0)["x"]])
  np.testing.assert_array_equal(both, data.client(0)["x"])


def test_split_clients_is_disjoint_and_complete():
  data = packed_dataset(np.arange(1, 21))
  train, hold = data.split_clients(0.25, seed=1)
  assert train.num_clients == 15 and hold.num_clients == 5
  all_starts = np.sort(np.concatenate([train.starts, hold.starts]))
  np.testing.assert_array_equal(all_starts, np.sort(data.starts))


def test_save_load_roundtrip_and_mmap(tmp_path):
  data = packed_dataset([2, 7, 3]).select([2, 0])  # a non-contiguous view
  data.save(str(tmp_path / "d"))
  for mmap in (False, True):
    back = FederatedData.load(str(tmp_path / "d"), mmap=mmap)
    assert isinstance(back.features["x"], np.memmap) == mmap
    np.testing.assert_array_equal(back.sizes, [3, 2])
    for i in range(2):
      np.testing.assert_array_equal(back.client(i)["x"], data.client(i)["x"])


def test_corrupt_or_missing_files_give_clear_errors(tmp_path):
  with pytest.raises(DataError, match="not a fedjax_sim dataset"):
    FederatedData.load(str(tmp_path))
  packed_dataset([2, 3]).save(str(tmp_path / "d"))
  with open(tmp_path / "d" / "x.npy", "wb") as f:
    f.write(b"not an npy file")
  with pytest.raises(DataError, match="corrupt"):
    FederatedData.load(str(tmp_path / "d"))


def test_bad_offsets_are_rejected():
  x = np.zeros((5, 2), np.float32)
  with pytest.raises(DataError, match="offsets"):
    FederatedData.from_offsets({"x": x}, [0, 3, 2, 5])
  with pytest.raises(DataError, match="hold 5 examples"):
    FederatedData.from_offsets({"x": x}, [0, 3, 6])
  with pytest.raises(DataError, match="same number of examples"):
    FederatedData.from_offsets({"x": x, "y": np.zeros(4)}, [0, 5])


def test_gather_of_an_empty_client_at_the_end_of_storage():
  x = np.arange(12, dtype=np.float32).reshape(6, 2)  # six distinct rows
  data = FederatedData.from_offsets({"x": x}, [0, 3, 6, 6])
  _, test = data.split_examples(0.2)
  ex, mask = test.gather([2, 0], 8)  # client 2 is empty and starts at row 6 == len(x)
  assert not mask[0].any() and mask[1].sum() == 1
  # Client 0's one test example (row 2), repeated into its padding.
  np.testing.assert_array_equal(ex["x"][1], np.broadcast_to(x[2], (8, 2)))
  # The empty client's slots hold stored rows, not uninitialised memory.
  assert all((row == x).all(1).any() for row in ex["x"][0])
