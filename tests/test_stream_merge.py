"""models/merge.py's merge_files: one streaming pass over two safetensors files for many weights,
bit-identical to the in-memory `merge` (a tiny model with fp32/fp16/bf16/fp64 weights, integer and
bool buffers and an -inf mask, in the spirit of mergekit's tiny test models)."""
import json
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file

from models import checkpoint
from models.merge import DEFAULT_CHUNK, MergeError, merge, merge_files

CONFIG = {"channels": [8, 16], "emb_dim": 16}
WEIGHTS = [0.0, 1.0, -1.5, 0.3, 2.0, 1e-3]


def tiny_model(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    state = {
        "embed.weight": torch.randn(37, 19, generator=g),
        "attn.q.weight": torch.randn(19, 19, generator=g) * 0.02,
        "attn.q.bias": torch.randn(19, generator=g),
        "mlp.fc.weight": (torch.randn(33, 5, generator=g) * 100).half(),
        "mlp.fc.bias": (torch.randn(300, generator=g) * 1e3).bfloat16(),
        "head.weight": torch.randn(11, 3, generator=g).double(),
        "norm.num_batches_tracked": torch.tensor(seed + 1),
        "norm.running_mean": torch.randn(19, generator=g),
        "attn.mask": torch.triu(torch.full((6, 6), float("-inf")), 1),
        "flags": torch.rand(5, generator=g) > 0.5,
        "tokens": torch.randint(0, 255, (9,), generator=g, dtype=torch.uint8),
        "rope.freqs": torch.randn(4, generator=g, dtype=torch.complex64),  # not real floats: copied, as in merge()
        "scale": torch.tensor(3.5 + seed),
        "empty": torch.zeros(0, 4),
        "tiny": torch.tensor([1e-40, -1e-40, 3e38, -3e38, 0.0, -0.0]),  # subnormals, near-overflow, signed zeros
    }
    for name in ("float8_e4m3fn", "float8_e5m2"):
        if hasattr(torch, name):
            state[f"fp8.{name}"] = torch.randn(10, generator=g).to(getattr(torch, name))
    return state


@pytest.fixture
def pair(tmp_path):
    base, other = tiny_model(0), tiny_model(1)
    checkpoint.save(tmp_path / "base.safetensors", base, "edm", CONFIG)
    checkpoint.save(tmp_path / "other.safetensors", other, "edm", CONFIG)
    return tmp_path / "base.safetensors", tmp_path / "other.safetensors", base, other


def bits(t: torch.Tensor) -> list[int]:
    return t.reshape(-1).view(torch.uint8).tolist() if t.numel() else []


def assert_bit_identical(got: dict, ref: dict) -> None:
    assert got.keys() == ref.keys()
    for k, r in ref.items():
        assert got[k].dtype == r.dtype and got[k].shape == r.shape, k
        assert bits(got[k]) == bits(r), k


@pytest.mark.parametrize("chunk", [1, 7, 64, DEFAULT_CHUNK])
@pytest.mark.parametrize("method", ["neon", "linear"])
def test_bit_identical_to_in_memory_merge_for_every_weight(pair, tmp_path, chunk, method):
    base_path, other_path, base, other = pair
    targets = {w: tmp_path / f"w={w:g}.safetensors" for w in WEIGHTS}
    paths = merge_files(base_path, other_path, targets, method=method, chunk=chunk)
    assert paths == {w: [p] for w, p in targets.items()}
    for w, path in targets.items():
        assert_bit_identical(load_file(str(path)), merge(base, other, w, method=method))


@pytest.mark.parametrize("writeback", ["cache", "stream"])
def test_bytes_identical_to_checkpoint_save_of_merge(pair, tmp_path, writeback):
    """What the merge stage writes today (checkpoint.save of merge()), byte for byte, metadata included."""
    base_path, other_path, base, other = pair
    extra = {"base_digest": "sha256:ab", "selftrained_digest": "sha256:cd"}
    targets = {w: tmp_path / f"w={w:g}.safetensors" for w in (1.5, -0.25)}
    merge_files(base_path, other_path, targets, other_name="artifacts/selftrained/model.safetensors",
                family="edm", config=CONFIG, extra=extra, writeback=writeback)
    for w, path in targets.items():
        ref = tmp_path / "ref.safetensors"
        checkpoint.save(ref, merge(base, other, w), "edm", CONFIG, extra={**extra, "neon_w": repr(w)})
        assert path.read_bytes() == ref.read_bytes()
        _, meta = checkpoint.read(path)
        assert meta["neon_w"] == repr(w) and meta["family"] == "edm" and json.loads(meta["config"]) == CONFIG


def test_metadata_defaults_to_the_bases(pair, tmp_path):
    base_path, other_path, *_ = pair
    merge_files(base_path, other_path, {2.0: tmp_path / "m.safetensors"}, extra={"note": "x"})
    _, meta = checkpoint.read(tmp_path / "m.safetensors")
    assert meta["family"] == "edm" and json.loads(meta["config"]) == CONFIG
    assert meta["neon_w"] == "2.0" and meta["note"] == "x"


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_base_anywhere_copies_the_tensor(tmp_path, bad):
    """Found in the last chunk: the chunks already merged are overwritten by the base's."""
    g = torch.Generator().manual_seed(0)
    base = {"w": torch.randn(50, generator=g), "v": torch.randn(4, generator=g)}
    other = {k: v + 1 for k, v in base.items()}
    base["w"][-1] = bad
    other["w"][3] = float("nan")  # broken too, but the base's own NaN/inf decides first, as in merge()
    checkpoint.save(tmp_path / "b.safetensors", base, "edm", CONFIG)
    checkpoint.save(tmp_path / "o.safetensors", other, "edm", CONFIG)
    merge_files(tmp_path / "b.safetensors", tmp_path / "o.safetensors", {1.0: tmp_path / "m.safetensors"}, chunk=8)
    got = load_file(str(tmp_path / "m.safetensors"))
    assert bits(got["w"]) == bits(base["w"])
    assert_bit_identical(got, merge(base, other, 1.0))


@pytest.mark.parametrize("bad", [float("nan"), float("-inf")])
def test_tensor_broken_only_in_other_is_refused_and_outputs_removed(tmp_path, bad):
    g = torch.Generator().manual_seed(0)
    base = {"a": torch.randn(40, generator=g), "z": torch.randn(40, generator=g)}
    other = {k: v * 2 for k, v in base.items()}
    other["z"][33] = bad
    checkpoint.save(tmp_path / "b.safetensors", base, "edm", CONFIG)
    checkpoint.save(tmp_path / "o.safetensors", other, "edm", CONFIG)
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(MergeError, match=r"`z` holds NaN/inf in the artifacts/selftrained/model\.safetensors"):
        merge_files(tmp_path / "b.safetensors", tmp_path / "o.safetensors",
                    {1.0: out / "a.safetensors", 2.0: out / "b.safetensors"}, chunk=8,
                    other_name="artifacts/selftrained/model.safetensors")
    assert list(out.iterdir()) == []


@pytest.mark.parametrize("change,match", [
    (lambda o: o.pop("attn.q.bias"), r"`attn\.q\.bias` is missing from the self-trained"),
    (lambda o: o.update(extra=torch.zeros(1)), r"`extra` is missing from the base"),
    (lambda o: o.update({"embed.weight": torch.zeros(37, 20)}), r"embed\.weight.*\(37, 19\).*\(37, 20\)"),
    (lambda o: o.update({"head.weight": torch.zeros(11, 3)}), r"head\.weight.*float64.*float32"),
])
def test_mismatches_refused_before_anything_is_written(tmp_path, change, match):
    base, other = tiny_model(0), tiny_model(1)
    change(other)
    checkpoint.save(tmp_path / "b.safetensors", base, "edm", CONFIG)
    checkpoint.save(tmp_path / "o.safetensors", other, "edm", CONFIG)
    with pytest.raises(MergeError, match=match):
        merge_files(tmp_path / "b.safetensors", tmp_path / "o.safetensors", {1.0: tmp_path / "m.safetensors"})
    with pytest.raises(MergeError, match=match):  # the same words as the in-memory merge
        merge(base, other, 1.0)
    assert not (tmp_path / "m.safetensors").exists()


def test_unknown_method_and_output_over_an_input(pair, tmp_path):
    base_path, other_path, *_ = pair
    with pytest.raises(MergeError, match="unknown merge method 'nope'"):
        merge_files(base_path, other_path, {1.0: tmp_path / "m.safetensors"}, method="nope")
    with pytest.raises(MergeError, match="is one of the inputs"):
        merge_files(base_path, other_path, {1.0: other_path})
    assert checkpoint.read(other_path)[0].keys() == tiny_model(1).keys()


def test_sharded_inputs_and_outputs(pair, tmp_path):
    *_, base, other = pair
    sharded = {}
    for name, state in (("base", base), ("other", other)):
        (tmp_path / name).mkdir()
        paths = checkpoint.write_state(tmp_path / name / "model.safetensors", state,
                                       checkpoint.metadata_for("edm", CONFIG), max_shard_size=1500)
        assert len(paths) > 2
        sharded[name] = paths[-1]
    (tmp_path / "out").mkdir()
    result = merge_files(sharded["base"], sharded["other"], {1.5: tmp_path / "out" / "model.safetensors"},
                         max_shard_size=1500)
    assert result[1.5][-1] == tmp_path / "out" / "model.safetensors.index.json" and len(result[1.5]) > 2
    got, meta = checkpoint.read(result[1.5][-1])
    assert meta["neon_w"] == "1.5"
    assert_bit_identical(got, merge(base, other, 1.5))


def test_bounded_memory_without_torch(tmp_path):
    """A 64 MB tensor merged for three weights: anonymous memory grows by a few chunks, not by the
    tensor, and the streaming path never imports torch."""
    script = textwrap.dedent(f"""
        import sys, threading, time
        import numpy as np
        from models import checkpoint
        from models.merge import merge_files
        d = {str(tmp_path)!r}
        rng = np.random.default_rng(0)
        big = rng.standard_normal(16 << 20, dtype=np.float32)
        for name, scale in (("b", 1.0), ("o", 1.01)):
            specs = {{"big": ("F32", big.shape), "bf": ("BF16", (1 << 20,))}}
            with checkpoint.open_writer(f"{{d}}/{{name}}.safetensors", specs) as w:
                w.write("big", big * np.float32(scale))
                w.write("bf", (big[:1 << 20] * np.float32(scale)).view(np.uint16)[1::2].copy())
        del big
        def anon():
            return int(next(l for l in open("/proc/self/status") if l.startswith("RssAnon")).split()[1]) * 1024
        start, peak, stop = anon(), [0], threading.Event()
        def sample():
            while not stop.is_set():
                peak[0] = max(peak[0], anon())
                time.sleep(0.001)
        t = threading.Thread(target=sample)
        t.start()
        merge_files(f"{{d}}/b.safetensors", f"{{d}}/o.safetensors",
                    {{w: f"{{d}}/m{{w}}.safetensors" for w in (0.5, 1.0, 2.0)}})
        stop.set()
        t.join()
        print(peak[0] - start, "torch" in sys.modules)
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=True)
    grown, torch_imported = out.stdout.split()
    assert torch_imported == "False"
    assert int(grown) < 24 << 20, f"anonymous memory grew by {int(grown) >> 20} MB for a 64 MB tensor"
