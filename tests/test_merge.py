"""models/merge.py: the Neon extrapolation theta_base - w * (theta_s - theta_base), tensor by tensor."""
import pytest
import torch
from torch import nn

from models.merge import MergeError, merge


def tiny_model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    m = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3), nn.Linear(3, 2))
    m.train()(torch.randn(8, 4))  # moves running stats and num_batches_tracked
    return m


@pytest.fixture
def states():
    base, other = tiny_model(0).state_dict(), tiny_model(1).state_dict()
    other["1.num_batches_tracked"] = torch.tensor(7)  # differs from the base's 1
    return base, other


def float_keys(state):
    return [k for k, v in state.items() if v.is_floating_point()]


@pytest.mark.parametrize("w", [0.0, 1.0, 0.5, -1.5, 2.0])
def test_formula(states, w):
    base, other = states
    out = merge(base, other, w)
    assert out.keys() == base.keys()
    for k in float_keys(base):
        expected = base[k].double() - w * (other[k].double() - base[k].double())
        torch.testing.assert_close(out[k].double(), expected, rtol=1e-6, atol=1e-6)


def test_w0_is_base_and_w1_is_reflection(states):
    base, other = states
    for k in float_keys(base):
        torch.testing.assert_close(merge(base, other, 0.0)[k], base[k], rtol=0, atol=0)
        torch.testing.assert_close(merge(base, other, 1.0)[k], 2 * base[k] - other[k])


def test_fp16_computed_in_fp32_and_cast_back():
    g = torch.Generator().manual_seed(0)
    b = (torch.randn(64, generator=g) * 10).half()
    s = (torch.randn(64, generator=g) * 10).half()
    out = merge({"x": b}, {"x": s}, 1.5)["x"]
    assert out.dtype == torch.float16
    ref = b.double() - 1.5 * (s.double() - b.double())
    torch.testing.assert_close(out.double(), ref, rtol=1e-3, atol=1e-2)
    assert torch.equal(out, (b.float() - 1.5 * (s.float() - b.float())).half())


def test_integer_buffers_copied_from_base(states):
    base, other = states
    out = merge(base, other, 2.0)
    assert out["1.num_batches_tracked"].dtype == torch.long
    assert out["1.num_batches_tracked"].item() == base["1.num_batches_tracked"].item()


@pytest.mark.parametrize("bad", [float("nan"), float("-inf")])
def test_tensors_non_finite_in_the_base_are_copied_from_it(states, bad):
    """An -inf attention mask or a NaN placeholder in the base is kept as is, in both inputs."""
    base, other = (dict(s) for s in states)
    for state in (base, other):
        state["0.weight"] = state["0.weight"].clone()
        state["0.weight"][0, 0] = bad
    out = merge(base, other, 1.0)
    torch.testing.assert_close(out["0.weight"], base["0.weight"], equal_nan=True, rtol=0, atol=0)
    assert not torch.equal(out["0.bias"], base["0.bias"])  # other tensors still merged


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_a_tensor_broken_only_in_the_self_trained_model_is_refused(states, bad):
    """A diverged fine-tune must not pass as a merge of the base: the tensor and checkpoint are named."""
    base, other = (dict(s) for s in states)
    other["0.weight"] = other["0.weight"].clone()
    other["0.weight"][1, 2] = bad
    with pytest.raises(MergeError, match=r"`0\.weight`.*NaN/inf in the artifacts/selftrained/model\.safetensors"):
        merge(base, other, 1.0, other_name="artifacts/selftrained/model.safetensors")


def test_missing_key_names_tensor(states):
    base, other = states
    del other["2.bias"]
    with pytest.raises(MergeError, match=r"2\.bias.*self-trained"):
        merge(base, other, 1.0)


def test_extra_key_names_tensor(states):
    base, other = states
    other["extra.weight"] = torch.zeros(1)
    with pytest.raises(MergeError, match=r"extra\.weight.*base"):
        merge(base, other, 1.0)


def test_shape_mismatch_names_tensor(states):
    base, other = states
    other["0.weight"] = torch.zeros(3, 5)
    with pytest.raises(MergeError, match=r"0\.weight.*\(3, 4\).*\(3, 5\)"):
        merge(base, other, 1.0)


def test_dtype_mismatch_names_tensor(states):
    base, other = states
    other["2.weight"] = other["2.weight"].double()
    with pytest.raises(MergeError, match=r"2\.weight.*float64"):
        merge(base, other, 1.0)


def test_unknown_method():
    with pytest.raises(MergeError, match="unknown merge method 'nope'"):
        merge({}, {}, 1.0, method="nope")


def test_merged_state_loads_strictly(states):
    base, other = states
    model = tiny_model(2)
    model.load_state_dict(merge(base, other, 1.5), strict=True)
    model.eval()(torch.randn(2, 4))


@pytest.mark.parametrize("method", ["neon", "linear"])
@pytest.mark.parametrize("w", [1.5, -0.3, 0.0])
def test_methods_same_bits_on_torch_and_numpy_with_or_without_delta_and_out(method, w):
    """One registered function serves `merge` (torch) and `merge_files` (numpy chunks, shared delta, out buffer)."""
    import numpy as np

    from models.merge import _METHODS

    fn = _METHODS[method]
    g = torch.Generator().manual_seed(0)
    b, o = torch.randn(1000, generator=g) * 3, torch.randn(1000, generator=g) * 3
    ref = fn(b, o, w)
    assert ref.dtype == torch.float32
    bn, on = b.numpy(), o.numpy()
    out = np.empty_like(bn)
    for got in (fn(bn, on, w), fn(bn, on, w, delta=on - bn, out=out), fn(b, o, w, delta=o - b, out=torch.empty(1000))):
        got = got.numpy() if isinstance(got, torch.Tensor) else got
        assert got.dtype == np.float32 and got.view(np.uint32).tolist() == ref.numpy().view(np.uint32).tolist()
    expected = (b.double() - w * (o.double() - b.double())) if method == "neon" else \
        (b.double() + w * (o.double() - b.double()))
    torch.testing.assert_close(ref.double(), expected, rtol=1e-6, atol=1e-6)


def test_merge_does_not_modify_its_inputs(states):
    base, other = states
    before = {k: v.clone() for k, v in base.items()}, {k: v.clone() for k, v in other.items()}
    merge(base, other, 2.0)
    merge(base, other, 2.0, method="linear")
    for state, copy in zip((base, other), before):
        assert all(torch.equal(state[k], copy[k]) for k in state)
