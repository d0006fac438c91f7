"""The batch store that lets a long pass resume: kept per identity, checked, never silently trusted."""

from __future__ import annotations

import pytest
import torch

from calibrated_sampling.batch_store import BatchStore


def test_batches_come_back_for_the_same_identity_only(tmp_path):
    path = tmp_path / "store.safetensors"
    store = BatchStore(path, {"fit": 1})
    store.put(0, {"x": torch.arange(6.0).reshape(2, 3)})
    store.put(2, {"x": torch.ones(1, 3), "y": torch.tensor([7])})
    again = BatchStore(path, {"fit": 1})
    assert len(again) == 2 and again.get(1) is None
    assert torch.equal(again.get(0)["x"], torch.arange(6.0).reshape(2, 3))
    assert torch.equal(again.get(2)["y"], torch.tensor([7]))
    assert again.seconds == 0  # no batch recorded its time
    again.put(3, {"x": torch.zeros(1), "seconds": torch.tensor(2.5, dtype=torch.float64)})
    assert BatchStore(path, {"fit": 1}).seconds == 2.5
    other = BatchStore(path, {"fit": 2})  # another round or fit: stale, not used
    assert len(other) == 0
    other.put(0, {"x": torch.zeros(1)})
    assert len(BatchStore(path, {"fit": 1})) == 0 and len(BatchStore(path, {"fit": 2})) == 1
    with pytest.raises(ValueError, match=f"{path} belongs to another run"):
        BatchStore(path, {"fit": 1}, other="refuse")  # a pass another fit may still resume
    other.remove()
    assert not path.exists()


def test_a_damaged_or_foreign_store_is_refused_by_name(tmp_path):
    path = tmp_path / "store.safetensors"
    BatchStore(path, {"fit": 1}).put(0, {"x": torch.arange(100.0)})
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x01  # one flipped bit in the tensor bytes
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=f"{path}.*corrupt"):
        BatchStore(path, {"fit": 1})
    path.write_bytes(bytes(data[:20]))  # truncated
    with pytest.raises(ValueError, match=f"{path}.*damaged"):
        BatchStore(path, {"fit": 1})
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(1)}, str(path))  # some other safetensors file under that name
    with pytest.raises(ValueError, match="not a calibrated-sampling batch store"):
        BatchStore(path, {"fit": 1})
