import json

import pytest
import torch

from memory3.model.checkpoint import CheckpointError, load_checkpoint, load_tokenizer, save_checkpoint
from memory3.model.init import random_model
from memory3.model.tokenizer import byte_level_tokenizer


def test_round_trip_gives_identical_logits(tmp_path, tiny_model, tiny_config):
    save_checkpoint(tiny_model, tmp_path / "ck", byte_level_tokenizer())
    loaded = load_checkpoint(tmp_path / "ck")
    assert loaded.config == tiny_config
    tokens = torch.randint(0, tiny_config.vocab_size, (2, 40))
    positions = torch.arange(40)[None].expand(2, -1)
    with torch.no_grad():
        torch.testing.assert_close(loaded(tokens, positions), tiny_model(tokens, positions), rtol=0, atol=0)
    assert load_tokenizer(tmp_path / "ck").get_vocab_size() == byte_level_tokenizer().get_vocab_size()
    bf16 = load_checkpoint(tmp_path / "ck", dtype=torch.bfloat16)
    assert bf16.output.weight.dtype == torch.bfloat16


def test_weights_are_safetensors_not_pickle(tmp_path, tiny_model):
    save_checkpoint(tiny_model, tmp_path / "ck")
    raw = (tmp_path / "ck" / "model.safetensors").read_bytes()
    header_len = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + header_len])
    assert "tok_embeddings.weight" in header


def test_missing_files_and_mismatches_are_reported(tmp_path, tiny_model, tiny_config):
    with pytest.raises(CheckpointError, match="config.json not found"):
        load_checkpoint(tmp_path / "nothing")
    save_checkpoint(tiny_model, tmp_path / "ck")
    with pytest.raises(CheckpointError, match="no tokenizer"):
        load_tokenizer(tmp_path / "ck")
    other = random_model(tiny_config.__class__.from_name("tiny", intermediate_size=64))
    save_checkpoint(other, tmp_path / "other")
    (tmp_path / "other" / "config.json").write_text(tiny_config.to_json())
    with pytest.raises(CheckpointError, match="has shape"):
        load_checkpoint(tmp_path / "other")
    (tmp_path / "ck" / "model.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(CheckpointError, match="not a readable safetensors"):
        load_checkpoint(tmp_path / "ck")


def test_weights_digest_survives_a_round_trip(tmp_path, tiny_model):
    from memory3.model.checkpoint import weights_digest

    save_checkpoint(tiny_model, tmp_path / "ck")
    assert weights_digest(load_checkpoint(tmp_path / "ck")) == weights_digest(tiny_model)
    other = random_model(tiny_model.config, seed=5)
    assert weights_digest(other) != weights_digest(tiny_model)


def test_a_cuda_device_where_there_is_none_is_said_so(tmp_path, tiny_model):
    """safetensors' own error blamed the file: "is not a readable safetensors file: pin_memory=True ..."."""
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    save_checkpoint(tiny_model, tmp_path / "ck")
    for device in ("cuda", "cuda:1", torch.device("cuda")):
        with pytest.raises(CheckpointError, match=r"^CUDA is not available on this machine; use --device cpu$"):
            load_checkpoint(tmp_path / "ck", device=device)


def test_a_config_that_disagrees_with_the_weights_or_mixed_dtypes_are_refused(tmp_path, tiny_model, tiny_config):
    """Conventions that keep every shape (memory layers, RoPE) loaded silently, and a half-converted
    file loaded and then failed at every forward."""
    save_checkpoint(tiny_model, tmp_path / "ck")
    config = json.loads((tmp_path / "ck" / "config.json").read_text())
    (tmp_path / "ck" / "config.json").write_text(json.dumps({**config, "memory_layers": [0, 1, 2],
                                                             "rope_theta": 500000.0, "extra": {"note": "kept"}}))
    with pytest.raises(CheckpointError, match=r"disagrees .* on memory_layers \(\[0, 1, 2\] here, \[0, 1\] there\), "
                                              r"rope_theta"):
        load_checkpoint(tmp_path / "ck")
    (tmp_path / "ck" / "config.json").write_text(json.dumps({**config, "extra": {"note": "provenance only"}}))
    load_checkpoint(tmp_path / "ck")

    from safetensors.torch import load_file, save_file
    weights = tmp_path / "ck" / "model.safetensors"
    state = load_file(str(weights))
    first = sorted(state)[0]
    save_file({**state, first: state[first].half()}, str(weights), metadata={"config": tiny_config.to_json()})
    with pytest.raises(CheckpointError, match=r"tensors of \['torch.float16', 'torch.float32'\]"):
        load_checkpoint(tmp_path / "ck")
    assert {p.dtype for p in load_checkpoint(tmp_path / "ck", dtype=torch.float32).parameters()} == {torch.float32}


def test_write_safetensors_writes_the_file_safetensors_writes(tmp_path, tiny_model):
    """Any safetensors reader opens it: the library's own writer's header (its order of the metadata's
    keys aside, which is a hash map's) and data, for every dtype and shape a checkpoint or an optimizer
    holds (scalars, empty tensors, views that are not contiguous)."""
    from safetensors.torch import load_file, save_file

    from memory3.model.checkpoint import write_safetensors

    tensors = {**tiny_model.state_dict(), "step": torch.tensor(7.0, dtype=torch.float64),
               "ids": torch.arange(5), "none": torch.zeros(0, 3), "half": torch.randn(3, 5).half(),
               "brain": torch.randn(7).bfloat16(), "mask": torch.tensor([True, False, True]),
               "transposed": torch.randn(4, 6).t(), "bytes": torch.arange(3, dtype=torch.uint8)}
    metadata = {"config": "{\"name\": \"tiny\"}", "note": "é"}
    write_safetensors(tmp_path / "ours.safetensors", tensors.items(), metadata)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp_path / "theirs.safetensors"), metadata)
    ours, theirs = (_safetensors_parts(tmp_path / f) for f in ("ours.safetensors", "theirs.safetensors"))
    assert ours == theirs
    loaded = load_file(str(tmp_path / "ours.safetensors"))
    assert loaded.keys() == tensors.keys()
    for name, tensor in tensors.items():
        torch.testing.assert_close(loaded[name], tensor, rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"^odd: torch.complex64 has no safetensors name$"):
        write_safetensors(tmp_path / "odd.safetensors", [("odd", torch.zeros(2, dtype=torch.complex64))])


def _safetensors_parts(path) -> tuple[int, dict, list[str], bytes]:
    """The header's length, the header, its tensors' order, and the data."""
    raw = path.read_bytes()
    length = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + length])
    return length, header, [k for k in header if k != "__metadata__"], raw[8 + length :]


class _DeviceTensor:
    """A tensor as far as `write_safetensors` asks of one on a GPU: its host copy is made by `.cpu()`."""

    def __init__(self, tensor: torch.Tensor, copies: list) -> None:
        self.tensor, self.copies = tensor, copies
        self.dtype, self.shape = tensor.dtype, tensor.shape

    def element_size(self) -> int:
        return self.tensor.element_size()

    def numel(self) -> int:
        return self.tensor.numel()

    def detach(self):
        return self

    def contiguous(self):
        return self

    def cpu(self) -> torch.Tensor:
        import weakref

        alive = [name for name, copy in self.copies if copy() is not None]
        assert not alive, f"host copies of {alive} are still held"
        host = self.tensor.clone()
        self.copies.append((tuple(self.shape), weakref.ref(host)))
        return host


def test_write_safetensors_holds_one_host_copy_at_a_time(tmp_path, tiny_model):
    """Saving a GPU model used to copy every weight (and AdamW's moments) to the host before writing."""
    from safetensors.torch import load_file

    from memory3.model.checkpoint import write_safetensors

    copies: list = []
    state = tiny_model.state_dict()
    write_safetensors(tmp_path / "w.safetensors", [(k, _DeviceTensor(v, copies)) for k, v in state.items()])
    assert len(copies) == len(state)  # each copied once, each gone before the next
    loaded = load_file(str(tmp_path / "w.safetensors"))
    for name, tensor in state.items():
        torch.testing.assert_close(loaded[name], tensor, rtol=0, atol=0)
