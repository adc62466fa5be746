"""models/checkpoint.py with models/edm.py and models/family.py: safetensors only, self-describing."""
import json
import random

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from models import checkpoint, edm, family
from models.checkpoint import CheckpointError, load_model, read, save

CONFIG = {"channels": [8, 16], "emb_dim": 16, "image_shape": [1, 28, 28], "sigma_data": 0.5, "dropout": 0.0}


def tiny_edm(config=CONFIG, seed=0):
    torch.manual_seed(seed)
    model = edm.build(config)
    with torch.no_grad():  # conv_out starts at zero: make the network's output depend on its weights
        model.net.conv_out.weight.add_(torch.randn_like(model.net.conv_out.weight) * 0.1)
    return model.eval()


@pytest.fixture
def saved(tmp_path):
    model = tiny_edm()
    path = tmp_path / "model.safetensors"
    save(path, model.state_dict(), "edm", CONFIG, extra={"note": "hi"})
    return model, path


def test_round_trip_metadata(saved):
    model, path = saved
    state, meta = read(path)
    assert meta["family"] == "edm" and meta["note"] == "hi"
    assert meta["format"] == "neon-checkpoint/1"
    assert json.loads(meta["config"]) == CONFIG
    assert state.keys() == model.state_dict().keys()
    for k, v in model.state_dict().items():
        assert torch.equal(state[k], v), k


def test_load_model_same_outputs(saved):
    model, path = saved
    loaded, fam, config = load_model(path, expect={"family": "edm", "channels": [8, 16]})
    assert fam is family.get("edm") and config == CONFIG and not loaded.training
    x, sigma = torch.randn(2, 1, 28, 28), torch.tensor([0.5, 3.0])
    with torch.no_grad():
        assert torch.equal(loaded(x, sigma), model(x, sigma))


@pytest.mark.parametrize("zip_format", [True, False])
def test_pickle_refused(tmp_path, zip_format):
    path = tmp_path / "model.pt"
    torch.save(tiny_edm().state_dict(), path, _use_new_zipfile_serialization=zip_format)
    with pytest.raises(CheckpointError, match="pickle.*safetensors"):
        load_model(path)


@pytest.mark.parametrize("data", [random.Random(0).randbytes(4096), b"", b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}      "])
def test_garbage_refused(tmp_path, data):
    path = tmp_path / "model.safetensors"
    path.write_bytes(data)
    with pytest.raises(CheckpointError, match="not a readable safetensors"):
        read(path)


def test_other_architecture_refused_by_expect(tmp_path):
    path = tmp_path / "big.safetensors"
    big = {**CONFIG, "channels": [16, 32]}
    save(path, tiny_edm(big).state_dict(), "edm", big)
    with pytest.raises(CheckpointError, match=r"channels=\[16, 32\].*\[8, 16\]"):
        load_model(path, expect={"family": "edm", "channels": [8, 16]})


def test_plain_state_dict_with_wrong_fallback(tmp_path):
    path = tmp_path / "plain.safetensors"
    save_file(tiny_edm({**CONFIG, "channels": [16, 32]}).state_dict(), str(path))
    with pytest.raises(CheckpointError, match=r"tensor `[\w.]+`"):
        load_model(path, fallback=("edm", CONFIG))


def test_plain_state_dict_with_right_fallback(tmp_path):
    path = tmp_path / "plain.safetensors"
    save_file(tiny_edm().state_dict(), str(path))
    model, _, config = load_model(path, fallback=("edm", CONFIG))
    assert config == CONFIG
    with pytest.raises(CheckpointError, match="no `family`/`config` metadata"):
        load_model(path)


def test_missing_tensor_named(tmp_path):
    path = tmp_path / "cut.safetensors"
    state = tiny_edm().state_dict()
    del state["net.conv_out.bias"]
    save(path, state, "edm", CONFIG)
    with pytest.raises(CheckpointError, match=r"net\.conv_out\.bias.*missing"):
        load_model(path)


def test_unknown_family(tmp_path):
    with pytest.raises(ValueError, match="unknown model family 'gan'.*edm"):
        family.get("gan")
    path = tmp_path / "gan.safetensors"
    save(path, tiny_edm().state_dict(), "gan", CONFIG)
    with pytest.raises(ValueError, match="unknown model family 'gan'"):
        load_model(path)


# ---- lazy reading and incremental writing (models.checkpoint.open_checkpoint / open_writer) ----------


def every_dtype(seed=0):
    """One tensor of each dtype torch and safetensors share, plus a scalar and an empty tensor."""
    g = torch.Generator().manual_seed(seed)
    state = {
        "f32.weight": torch.randn(7, 5, generator=g), "f16": torch.randn(9, generator=g).half(),
        "bf16": torch.randn(3, 4, generator=g).bfloat16(), "f64": torch.randn(6, generator=g).double(),
        "i64.num_batches_tracked": torch.tensor(12), "i32": torch.arange(-3, 4, dtype=torch.int32),
        "i16": torch.arange(5, dtype=torch.int16), "i8": torch.arange(-2, 3, dtype=torch.int8),
        "u8": torch.arange(4, dtype=torch.uint8), "mask": torch.rand(6, generator=g) > 0.5,
        "c64": torch.randn(3, generator=g, dtype=torch.complex64), "scalar": torch.tensor(2.5),
        "empty": torch.zeros(0, 3), "a": torch.ones(1, 1, 1),
        "u16": torch.arange(3).to(torch.uint16), "u32": torch.arange(3).to(torch.uint32),
        "u64": torch.arange(3).to(torch.uint64),
    }
    for name in ("float8_e4m3fn", "float8_e5m2"):
        if hasattr(torch, name):
            state[name] = torch.randn(10, generator=g).to(getattr(torch, name))
    return state


METAS = [None, {}, {"neon": json.dumps({"config": "{\"a\": [1, 2]}", "family": "edm"})},
         {"neon": "quotes \" backslash \\ newline \n tab \t ctrl \x01 del \x7f unicode é ✓ 😀 </script>"}]


@pytest.mark.parametrize("meta", METAS)
def test_writer_bytes_identical_to_save_file(tmp_path, meta):
    state = every_dtype()
    save_file(state, str(tmp_path / "ref.safetensors"), metadata=meta)
    checkpoint.write_state(tmp_path / "ours.safetensors", state, meta)
    assert (tmp_path / "ours.safetensors").read_bytes() == (tmp_path / "ref.safetensors").read_bytes()


def test_writer_in_pieces_any_tensor_order(tmp_path):
    """Header first, then pieces of each tensor as they come (last tensor first): still save_file's bytes."""
    state = {"b": torch.randn(40), "a": torch.randn(3, 11).half(), "c": torch.arange(10)}
    save_file(state, str(tmp_path / "ref.safetensors"))
    with checkpoint.open_writer(tmp_path / "ours.safetensors", checkpoint.specs_of(state)) as writer:
        for name in reversed(writer.order):
            flat = state[name].reshape(-1)
            for s in range(0, flat.numel(), 7):
                writer.write(name, flat[s:s + 7].numpy() if name != "a" else flat[s:s + 7], s)
    assert (tmp_path / "ours.safetensors").read_bytes() == (tmp_path / "ref.safetensors").read_bytes()


def test_writer_refuses_gaps_misfits_and_incomplete_files(tmp_path):
    writer = checkpoint.SafetensorsWriter(tmp_path / "x.safetensors", {"t": ("F32", (4,)), "u": ("I64", (2,))})
    with pytest.raises(ValueError, match="gap"):
        writer.write("t", np.zeros(1, np.float32), 2)
    with pytest.raises(ValueError, match="do not fit"):
        writer.write("t", np.zeros(5, np.float32))
    writer.write("t", np.zeros(4, np.float32))
    with pytest.raises(ValueError, match="`u` was not written in full"):
        writer.close()


@pytest.mark.parametrize("stream", [False, True])
def test_streamed_writes_same_bytes(tmp_path, monkeypatch, stream):
    """Streaming hands windows to writeback and drops them from the cache: the bytes stay the same."""
    monkeypatch.setattr(checkpoint, "STREAM_WINDOW", 4096)
    state = {"big": torch.randn(50_000), "small": torch.randn(3).bfloat16()}
    save_file(state, str(tmp_path / "ref.safetensors"))
    with checkpoint.open_writer(tmp_path / "ours.safetensors", checkpoint.specs_of(state), stream=stream) as writer:
        for name in writer.order:
            flat = state[name].reshape(-1)
            for s in range(0, flat.numel(), 1000):
                writer.write(name, flat[s:s + 1000], s)
    assert (tmp_path / "ours.safetensors").read_bytes() == (tmp_path / "ref.safetensors").read_bytes()


def test_reader_zero_copy_views_and_metadata(saved):
    _, path = saved
    ref = load_file(str(path))
    with checkpoint.open_checkpoint(path) as ckpt:
        assert ckpt.meta["family"] == "edm" and ckpt.meta["note"] == "hi"
        assert list(ckpt.tensors) == list(checkpoint.read_header(path)[1])
        assert set(ckpt.tensors) == set(ref)
        for name, t in ref.items():
            info = ckpt.tensors[name]
            assert info.shape == tuple(t.shape) and str(info.dtype) == str(t.dtype)
            assert torch.equal(ckpt.tensor(name), t)
            arr = ckpt.array(name)
            assert not arr.flags.owndata and not arr.flags.writeable  # a read-only view of the mapped file
            np.testing.assert_array_equal(arr, t.numpy())


def test_reader_every_dtype(tmp_path):
    state = every_dtype(3)
    save_file(state, str(tmp_path / "m.safetensors"), metadata={"k": "v"})
    with checkpoint.open_checkpoint(tmp_path / "m.safetensors") as ckpt:
        assert ckpt.metadata == {"k": "v"} and ckpt.meta == {"k": "v"}
        for name, t in state.items():
            got = ckpt.tensor(name)
            assert got.dtype == t.dtype and got.shape == t.shape
            assert torch.equal(got.view(-1).view(torch.uint8), t.reshape(-1).view(torch.uint8)) if t.numel() else True


def _raw_file(path, header, data=b""):
    text = json.dumps(header).encode()
    path.write_bytes(len(text).to_bytes(8, "little") + text + data)
    return path


@pytest.mark.parametrize("header,data,why", [
    ({"t": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 4, "cover 8 bytes"),
    ({"t": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}}, b"\0" * 4, "4 bytes for shape"),
    ({"t": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}, b"\0" * 8, "starts at byte 4"),
    ({"t": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},
      "u": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 8, "starts at byte 0, expected 4"),
    ({"t": {"dtype": "Q7", "shape": [1], "data_offsets": [0, 1]}}, b"\0", "malformed or unsupported"),
    ({"t": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}, b"\0" * 4, "malformed"),
    ({"__metadata__": {"a": 1}}, b"", "map of strings"),
])
def test_reader_refuses_malformed_headers(tmp_path, header, data, why):
    path = _raw_file(tmp_path / "bad.safetensors", header, data)
    with pytest.raises(CheckpointError, match=f"not a readable safetensors.*{why}"):
        checkpoint.open_checkpoint(path)


@pytest.mark.parametrize("data", [b"", b"\x01\x00", b"\xff" * 8 + b"{}", b"\x04\x00\x00\x00\x00\x00\x00\x00[1] "])
def test_reader_refuses_garbage(tmp_path, data):
    path = tmp_path / "g.safetensors"
    path.write_bytes(data)
    with pytest.raises(CheckpointError, match="not a readable safetensors"):
        checkpoint.open_checkpoint(path)


def test_reader_refuses_pickle(tmp_path):
    path = tmp_path / "model.pt"
    torch.save({"w": torch.zeros(3)}, path)
    with pytest.raises(CheckpointError, match="pickle"):
        checkpoint.open_checkpoint(path)


def test_sharded_write_matches_huggingface_and_reads_back(tmp_path):
    from huggingface_hub import split_torch_state_dict_into_shards

    g = torch.Generator().manual_seed(0)
    state = {f"layer.{i}.weight": torch.randn(100 * (i % 3 + 1), generator=g) for i in range(8)}
    state["big"] = torch.randn(700, generator=g)  # over the limit: a shard of its own
    state["buf"] = torch.arange(5)
    state = dict(sorted(state.items()))
    meta = checkpoint.metadata_for("edm", CONFIG, {"neon_w": "1.0"})
    paths = checkpoint.write_state(tmp_path / "model.safetensors", state, meta, max_shard_size=2000)
    hf = split_torch_state_dict_into_shards(state, max_shard_size=2000)
    assert hf.is_sharded and sorted(p.name for p in paths[:-1]) == sorted(hf.filename_to_tensors)
    assert paths[-1].name == "model.safetensors.index.json" and not (tmp_path / "model.safetensors").exists()
    index = json.loads(paths[-1].read_text())
    assert index["weight_map"] == hf.tensor_to_filename
    assert index["metadata"]["total_size"] == hf.metadata["total_size"] and index["metadata"]["neon"] == meta["neon"]
    for shard, names in hf.filename_to_tensors.items():
        loaded = load_file(str(tmp_path / shard))
        assert set(loaded) == set(names) and all(torch.equal(loaded[n], state[n]) for n in names)
    for path in (paths[-1], tmp_path / "model.safetensors"):  # the index, or the path the writer was given
        with checkpoint.open_checkpoint(path) as ckpt:
            assert ckpt.meta["family"] == "edm" and ckpt.meta["neon_w"] == "1.0"
            assert set(ckpt.tensors) == set(state) and all(torch.equal(ckpt.tensor(n), t) for n, t in state.items())
    for path in (paths[-1], tmp_path / "model.safetensors"):
        got, meta_read = read(path)
        assert meta_read["neon_w"] == "1.0" and all(torch.equal(got[n], t) for n, t in state.items())


def test_small_outputs_are_not_sharded(tmp_path):
    state = {"w": torch.randn(10)}
    assert checkpoint.write_state(tmp_path / "m.safetensors", state) == [tmp_path / "m.safetensors"]
    unlimited = checkpoint.write_state(tmp_path / "n.safetensors", state, max_shard_size=None)
    assert unlimited == [tmp_path / "n.safetensors"]


@pytest.mark.parametrize("target", ["../outside.safetensors", "sub/x.safetensors", ""])
def test_index_refuses_paths_outside_its_folder(tmp_path, target):
    path = tmp_path / "model.safetensors.index.json"
    path.write_text(json.dumps({"metadata": {}, "weight_map": {"w": target}}))
    with pytest.raises(CheckpointError, match="not a file beside the index"):
        checkpoint.open_checkpoint(path)


def test_index_naming_a_missing_tensor_refused(tmp_path):
    save_file({"w": torch.zeros(2)}, str(tmp_path / "s.safetensors"))
    path = tmp_path / "model.safetensors.index.json"
    path.write_text(json.dumps({"metadata": {}, "weight_map": {"w": "s.safetensors", "v": "s.safetensors"}}))
    with pytest.raises(CheckpointError, match="`v` is not in its shard"):
        checkpoint.open_checkpoint(path)
