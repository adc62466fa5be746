"""stages/params.py: params.yaml validation, one line naming the dotted key."""
from pathlib import Path

import pytest

from stages.params import Params, ParamsError, load, parse, sampler_settings

REPO_PARAMS = Path(__file__).resolve().parents[1] / "params.yaml"


def test_defaults_parse():
    p = parse({})
    assert p == Params()
    assert p.merge.weights == [0.5, 1.0, 1.5]
    assert p.sample.sampler.edm.num_steps == 10


def test_params_yaml_documents_the_code_defaults():
    """params.yaml is where users read the defaults: it must say what the code does with no params."""
    assert load(REPO_PARAMS) == Params()


def test_repository_params_load():
    p = load(REPO_PARAMS)
    assert p.model.family == "edm"
    assert p.merge.weights and p.sample.n > 0


def test_partial_override_keeps_other_defaults():
    p = parse({"sample": {"sampler": {"edm": {"num_steps": 4}}}})
    assert p.sample.sampler.edm.num_steps == 4 and p.sample.n == Params().sample.n


def test_every_registered_family_has_its_sections():
    from models import family

    p = Params()
    for name, fam in family.all_families().items():
        assert isinstance(getattr(p.model, name), fam.Config)
        assert isinstance(p.sample.sampler.for_family(name), fam.Settings)


def test_switching_family_needs_no_other_edit():
    p = parse({"model": {"family": "flow"}})
    assert p.model.family_config()["channels"] == [16, 32, 32]
    assert p.sample.sampler.for_family("flow").method == "euler"


def test_evaluation_sampler_override_is_checked_against_the_family():
    p = parse({"model": {"family": "toy_diffusion"}, "evaluate": {"sampler": {"zeta": 1.0}}})
    assert sampler_settings(p.sample, p.model, p.evaluate.sampler).zeta == 1.0
    with pytest.raises(ParamsError, match="evaluate.sampler.temperature") as exc:
        parse({"model": {"family": "toy_diffusion"}, "evaluate": {"sampler": {"temperature": 1.0}}})
    assert "zeta" in str(exc.value)


@pytest.mark.parametrize("raw, expected", [
    ({"bogus": 1}, ["unknown key `bogus`"]),
    ({"sample": {"sampler": {"edm": {"num_step": 5}}}}, ["unknown key `sample.sampler.edm.num_step`"]),
    ({"model": {"family": "gan"}}, ["`model.family`", "'gan'", "edm", "flow"]),
    ({"merge": {"weights": ["abc"]}}, ["`merge.weights.0`", "'abc'"]),
    ({"sample": {"n": -3}}, ["`sample.n`", "-3", "greater than 0"]),
    ({"base": {"sha256": "xyz"}}, ["`base.sha256`", "'xyz'"]),
    ({"merge": {"weights": [1.0, 1.0]}}, ["`merge.weights`", "[1.0, 1.0]", "distinct"]),
])
def test_errors_name_key_on_one_line(raw, expected):
    with pytest.raises(ParamsError) as exc:
        parse(raw)
    msg = str(exc.value)
    assert "\n" not in msg
    for part in expected:
        assert part in msg


def test_invalid_yaml(tmp_path):
    f = tmp_path / "params.yaml"
    f.write_text("sample: [unclosed\n")
    with pytest.raises(ParamsError, match="not valid YAML") as exc:
        load(f)
    assert "\n" not in str(exc.value)


def test_yaml_not_a_mapping(tmp_path):
    f = tmp_path / "params.yaml"
    f.write_text("- a\n- b\n")
    with pytest.raises(ParamsError, match="expected a mapping"):
        load(f)


def test_missing_file(tmp_path):
    with pytest.raises(ParamsError, match="not found"):
        load(tmp_path / "nope.yaml")
