"""The rule engine: parsing, validation errors, evaluation, evidence, predicted gain, rendering."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from autoopt.diagnosis import predicted_gain as gain
from autoopt.diagnosis import rules as R
from autoopt.diagnosis.explain import render_explain, render_rules_table
from autoopt.errors import UserError
from autoopt.types import Finding

DOC = """## What it does
Fires in tests.

## Why is this bad?
Because.

## Example
```python
x = 1
```

## Use instead
```python
x = 2
```

## Fix safety
Safe.
"""

BASE_META = {
    "code": '"AO101"',
    "name": '"test-rule"',
    "title": '"A test rule"',
    "when": "[\"device.type == 'cuda'\", \"metrics.fp32_matmul_fraction >= 0.3\"]",
    "transform": '"amp"',
    "params": '{ dtype = "bfloat16" }',
    "safety": '"unsafe"',
}


def front(meta: dict[str, str]) -> str:
    return "\n".join(f"{k} = {v}" for k, v in meta.items())


def write_rule(directory: Path, meta: dict[str, str] | None = None, doc: str = DOC, filename: str | None = None,
               **changes: str | None) -> Path:
    m = dict(BASE_META if meta is None else meta)
    for k, v in changes.items():
        if v is None:
            m.pop(k, None)
        else:
            m[k] = v
    code = m.get("code", '"AO101"').strip('"')
    name = m.get("name", '"test-rule"').strip('"')
    path = directory / (filename or f"{code}-{name}.md")
    path.write_text(f"+++\n{front(m)}\n+++\n{doc}", encoding="utf-8")
    return path


def load_one(tmp_path: Path, **changes) -> R.Rule:
    write_rule(tmp_path, **changes)
    rules = R.load_rules(tmp_path)
    assert len(rules) == 1
    return rules[0]


def error_of(tmp_path: Path, **changes) -> str:
    path = write_rule(tmp_path, **changes)
    with pytest.raises(UserError) as exc:
        R.load_rules(tmp_path)
    msg = exc.value.message
    assert path.name in msg, msg  # names the file
    assert "Fix:" in msg, msg  # and the fix
    return msg


# --------------------------------------------------------------------------- conditions


@pytest.mark.parametrize(
    "text, field, op, value",
    [
        ("device.type == 'cuda'", "device.type", "==", "cuda"),
        ('device.type != "cpu"', "device.type", "!=", "cpu"),
        ("metrics.idle_fraction >= 0.3", "metrics.idle_fraction", ">=", 0.3),
        ("metrics.idle_fraction<.5", "metrics.idle_fraction", "<", 0.5),
        ("metrics.kernels_per_step > 200", "metrics.kernels_per_step", ">", 200),
        ("metrics.kernels_per_step <= 1e3", "metrics.kernels_per_step", "<=", 1000.0),
        ("device.compute_capability >= -1", "device.compute_capability", ">=", -1),
        ("device.bf16 == true", "device.bf16", "==", True),
        ("workload.autocast != false", "workload.autocast", "!=", False),
        ("device.name == 'it\\'s'", "device.name", "==", "it's"),
        ("  metrics.comm_backend == ''  ", "metrics.comm_backend", "==", ""),
    ],
)
def test_parse_condition(text, field, op, value):
    c = R.parse_condition(text)
    assert (c.field, c.op, c.value) == (field, op, value)
    assert type(c.value) is type(value)


@pytest.mark.parametrize(
    "text, problem, fix",
    [
        ("metrics.idel_fraction >= 0.3", "not a documented fact", "metrics.idle_fraction"),
        ("metrics.no_such_thing >= 0.3", "not a documented fact", "autoopt/facts.py"),
        ("metrics.idle_fraction = 0.3", "'=' at column", "== != < <= > >="),
        ("metrics.idle_fraction => 0.3", "'=' at column", "== != < <= > >="),
        ("metrics.idle_fraction 0.3", "no comparison operator", "== != < <= > >="),
        ("metrics.idle_fraction >=", "nothing to compare", "literal"),
        ("metrics.idle_fraction >= 0.3 and x", "extra tokens", "separate strings"),
        ("device.type == 'cuda", "not closed", "matching '"),
        ("device.type == cuda", "not a literal", "quote it"),
        ("metrics.idle_fraction >= 'high'", "number fact but the literal 'high' is a string", "a number"),
        ("device.bf16 == 1", "bool fact but the literal 1 is a number", "true or false"),
        ("device.type == true", "string fact", "quoted string"),
        ("device.bf16 >= true", ">= does not order bool", "== or !="),
        ("device.type < 'z'", "< does not order string", "== or !="),
        ("0.3 <= metrics.idle_fraction", "not a fact name", "field op literal"),
        ("true == device.bf16", "not a fact name", "field op literal"),
        ("metrics.idle_fraction >= 0.3;", "unexpected character ';'", "field op literal"),
        ("", "empty", "field op literal"),
        ("metrics.idle_fraction >= ==", "cannot be a literal", "a number"),
    ],
)
def test_condition_errors(text, problem, fix):
    with pytest.raises(R.ConditionError) as exc:
        R.parse_condition(text)
    assert problem in exc.value.problem
    assert fix in exc.value.fix


def test_condition_not_a_string():
    with pytest.raises(R.ConditionError) as exc:
        R.parse_condition(0.3)  # type: ignore[arg-type]
    assert "must be a string" in exc.value.problem


def test_no_eval(monkeypatch):
    import builtins

    def boom(*a, **k):  # pragma: no cover - must not be called
        raise AssertionError("eval/exec used")

    monkeypatch.setattr(builtins, "eval", boom)
    monkeypatch.setattr(builtins, "exec", boom)
    c = R.parse_condition("metrics.idle_fraction >= 0.3")
    assert c.holds({"metrics.idle_fraction": 0.4})
    with pytest.raises(R.ConditionError):
        R.parse_condition("__import__('os').system('true') == 1")


@pytest.mark.parametrize(
    "cond, value, expected",
    [
        ("metrics.idle_fraction >= 0.3", 0.3, True),
        ("metrics.idle_fraction >= 0.3", 0.29, False),
        ("metrics.idle_fraction > 0.3", 0.3, False),
        ("metrics.idle_fraction < 0.3", 0.1, True),
        ("metrics.idle_fraction <= 0.3", 0.3, True),
        ("metrics.idle_fraction != 0.3", 0.3, False),
        ("metrics.kernels_per_step == 5", 5.0, True),
        ("metrics.idle_fraction >= 0.3", None, False),
        ("metrics.idle_fraction < 0.3", None, False),
        ("metrics.idle_fraction != 0.3", None, False),
        ("metrics.idle_fraction < 0.3", float("nan"), False),
        ("metrics.idle_fraction >= 0.3", "0.5", False),  # wrong type from a producer: false
        ("metrics.idle_fraction >= 0.3", True, False),
        ("device.bf16 == true", True, True),
        ("device.bf16 == true", 1, False),
        ("device.bf16 != true", None, False),
        ("device.type == 'cuda'", "cuda", True),
        ("device.type != 'cuda'", "cpu", True),
        ("device.type == 'cuda'", None, False),
    ],
)
def test_condition_holds(cond, value, expected):
    c = R.parse_condition(cond)
    facts = {} if value is None else {c.field: value}
    assert c.holds(facts) is expected
    if value is None:
        assert c.holds({c.field: None}) is False


# --------------------------------------------------------------------------- rule files


def test_load_valid_rule(tmp_path):
    r = load_one(tmp_path, unless="[\"workload.autocast == true\"]", message='"{metrics.fp32_matmul_fraction:.0%} fp32"')
    assert r.code == "AO101" and r.name == "test-rule" and r.title == "A test rule"
    assert r.family == "precision"
    assert [c.field for c in r.conditions] == ["device.type", "metrics.fp32_matmul_fraction"]
    assert [c.field for c in r.unless] == ["workload.autocast"]
    assert r.transform == "amp" and r.params == {"dtype": "bfloat16"} and r.safety == "unsafe"
    assert r.doc.startswith("## What it does") and r.path.name == "AO101-test-rule.md"
    j = r.to_json()
    assert {"code", "name", "title", "transform", "safety"} <= set(j)
    assert j["code"] == "AO101" and j["transform"] == "amp" and j["safety"] == "unsafe"
    json.dumps(j)


def test_advice_only_rule_and_empty_transform(tmp_path):
    r = load_one(tmp_path, transform='""', params=None, safety='"manual"')
    assert r.transform is None and r.params == {}
    r2 = load_one(tmp_path, transform=None, params=None, safety='"manual"')
    assert r2.transform is None


@pytest.mark.parametrize(
    "changes, expected",
    [
        ({"code": None}, "lacks code"),
        ({"when": None}, "lacks when"),
        ({"safety": None}, "lacks safety"),
        ({"wehn": '["device.bf16 == true"]'}, "did you mean 'when'"),
        ({"code": '"AO12"', "_file": "AO12-test-rule.md"}, "does not follow AO###-slug.md"),
        ({"code": '"AO000"', "_file": "AO000-test-rule.md"}, "AO001..AO999"),
        ({"code": '"AO102"', "_file": "AO101-test-rule.md"}, "rename the file to AO102-test-rule.md"),
        ({"name": '"Test_Rule"', "_file": "AO101-test-rule.md"}, "lowercase words"),
        ({"family": '"layout"'}, "does not match the code range AO1xx"),
        ({"safety": '"risky"'}, "safety 'risky' is not one of safe, unsafe, manual"),
        ({"transform": '"amps"'}, "did you mean 'amp'"),
        ({"transform": '"quantize"'}, "transform 'quantize' is unknown"),
        ({"transform": '"batch_size"', "params": None, "safety": '"safe"'}, "set safety = \"manual\""),
        ({"params": '"dtype"'}, "params must be a table"),
        ({"transform": None}, "params are given for an advice-only rule"),
        ({"when": "\"device.bf16 == true\""}, "when must be a list"),
        ({"when": "[]"}, "would fire on every run"),
        ({"when": "[\"metrics.idel_fraction >= 0.3\"]"}, "'metrics.idel_fraction' is not a documented fact"),
        ({"when": "[\"metrics.idle_fraction >= 'x'\"]"}, "when condition \"metrics.idle_fraction >= 'x'\""),
        ({"unless": "[\"device.bf16 == 'yes'\"]"}, "unless condition"),
        ({"unless": "\"device.bf16 == true\""}, "unless must be a list"),
        ({"title": "3"}, "title must be a non-empty string"),
        ({"message": "3"}, "message must be a string"),
        ({"message": '"{metrics.nope:.0%}"'}, "placeholder {metrics.nope} is not a documented fact"),
        ({"message": '"{device.type:.0%}"'}, "does not fit a string fact"),
        ({"message": '"{device.type!r}"'}, "uses a conversion"),
        ({"message": '"{device.type"'}, "does not parse"),
        ({"gain": '{ model = "magic" }'}, "gain spec is invalid: model 'magic'"),
        ({"gain": '{ shares = ["metrics.idle_fraction"], removable = 1.5 }'}, "removable must be a number in (0, 1]"),
        ({"gain": '{ shares = ["metrics.idle_fraction"] }'}, "removable must be"),
        ({"gain": '{ shares = [], removable = 0.5 }'}, "shares must be a non-empty list"),
        ({"gain": '{ shares = ["metrics.nope"], removable = 0.5 }'}, "'metrics.nope' is not a documented fact"),
        ({"gain": '{ shares = ["device.type"], removable = 0.5 }'}, "device.type is not a number fact"),
        ({"gain": '{ shares = ["metrics.idle_fraction"], removable = 0.5, scale = 2 }'}, "unknown keys scale"),
        ({"gain": '{ model = "batch_size", memory_budget = 0 }'}, "memory_budget must be"),
        ({"gain": '{ model = "rank_skew", x = 1 }'}, "unknown keys x"),
        ({"gain": '"big"'}, "gain must be a table"),
        ({"locations": '"metrics.where"'}, "locations 'metrics.where' is not a known list"),
        ({"title": "= broken"}, "not valid TOML"),
    ],
)
def test_rule_file_errors(tmp_path, changes, expected):
    changes = dict(changes)
    filename = changes.pop("_file", None)
    path = write_rule(tmp_path, filename=filename, **changes)
    with pytest.raises(UserError) as exc:
        R.load_rules(tmp_path)
    msg = exc.value.message
    assert path.name in msg and "Fix:" in msg, msg
    assert expected in msg, msg


def test_front_matter_delimiters(tmp_path):
    p = tmp_path / "AO101-test-rule.md"
    p.write_text("code = 'AO101'\n" + DOC)
    with pytest.raises(UserError, match="does not start with a '\\+\\+\\+' line"):
        R.load_rules(tmp_path)
    p.write_text("+++\ncode = 'AO101'\n" + DOC)
    with pytest.raises(UserError, match="front matter is not closed"):
        R.load_rules(tmp_path)


def test_unreadable_rule_file(tmp_path):
    p = tmp_path / "AO101-test-rule.md"
    p.write_bytes(b"+++\n\xff\xfe\n+++\n")
    with pytest.raises(UserError, match="cannot be read"):
        R.load_rules(tmp_path)


@pytest.mark.parametrize(
    "doc, expected",
    [
        (DOC.replace("## Fix safety\nSafe.\n", ""), "lacks '## Fix safety'"),
        (DOC.replace("## Why is this bad?", "## Why it matters"), "lacks '## Why is this bad?'"),
        (DOC.replace("## Example", "## X").replace("## Use instead", "## Example").replace("## X", "## Use instead"),
         "out of order"),
        (DOC.replace("Because.\n", ""), "section '## Why is this bad?' is empty"),
    ],
)
def test_doc_section_errors(tmp_path, doc, expected):
    msg = error_of(tmp_path, doc=doc)
    assert expected in msg
    if "empty" not in expected:
        assert "## What it does; ## Why is this bad?; ## Example; ## Use instead; ## Fix safety" in msg


def test_extra_doc_sections_allowed(tmp_path):
    r = load_one(tmp_path, doc=DOC + "\n## References\n- somewhere\n")
    assert "## References" in r.doc


def test_duplicate_code_and_name(tmp_path):
    write_rule(tmp_path)
    write_rule(tmp_path, name='"other-rule"', when="[\"device.type == 'cpu'\"]")
    with pytest.raises(UserError, match="code AO101 is also used by"):
        R.load_rules(tmp_path)
    d2 = tmp_path / "two"
    d2.mkdir()
    write_rule(d2)
    write_rule(d2, code='"AO102"', when="[\"device.type == 'cpu'\"]")
    with pytest.raises(UserError, match="name 'test-rule' is also used by"):
        R.load_rules(d2)


def test_same_transform_must_be_exclusive(tmp_path):
    write_rule(tmp_path)
    write_rule(tmp_path, code='"AO102"', name='"other"', when="[\"metrics.idle_fraction >= 0.5\"]")
    with pytest.raises(UserError) as exc:
        R.load_rules(tmp_path)
    assert "AO102 and AO101 both propose transform 'amp'" in exc.value.message
    assert "mutually exclusive" in exc.value.message


def test_same_transform_exclusive_ok(tmp_path):
    write_rule(tmp_path)
    # exclusive through device.type
    write_rule(tmp_path, code='"AO102"', name='"cpu-one"', when="[\"device.type == 'cpu'\"]")
    # exclusive through an unless that negates a when of AO101
    write_rule(tmp_path, code='"AO103"', name='"low-fp32"', when="[\"device.bf16 == true\"]",
               unless="[\"metrics.fp32_matmul_fraction >= 0.3\", \"device.type == 'cpu'\"]")
    # complementary settings of the same transform: disjoint params may fire together
    write_rule(tmp_path, code='"AO104"', name='"scaler"', when="[\"device.bf16 == true\"]",
               params="{ grad_scaler = true }")
    rules = R.load_rules(tmp_path)
    assert [r.code for r in rules] == ["AO101", "AO102", "AO103", "AO104"]


@pytest.mark.parametrize(
    "a_when, a_unless, b_when, b_unless, exclusive",
    [
        (["device.type == 'cuda'"], [], ["device.type == 'cpu'"], [], True),
        (["device.type == 'cuda'"], [], ["device.type != 'cuda'"], [], True),
        (["device.type == 'cuda'"], [], ["device.bf16 == true"], [], False),
        (["device.bf16 == true"], [], ["device.bf16 == false"], [], True),
        (["device.bf16 == true"], [], ["device.bf16 != false"], [], False),
        (["metrics.idle_fraction >= 0.5"], [], ["metrics.idle_fraction < 0.5"], [], True),
        (["metrics.idle_fraction >= 0.5"], [], ["metrics.idle_fraction <= 0.5"], [], False),
        (["metrics.idle_fraction > 0.5"], [], ["metrics.idle_fraction <= 0.5"], [], True),
        (["metrics.idle_fraction >= 0.2", "metrics.idle_fraction <= 0.4"], [], ["metrics.idle_fraction > 0.4"], [], True),
        (["metrics.idle_fraction == 0.3"], [], ["metrics.idle_fraction != 0.3"], [], True),
        (["workload.autocast == true"], [], ["device.type == 'cuda'"], ["workload.autocast == true"], True),
        # an unless on a fact that neither rule requires known does not make them exclusive
        (["device.type == 'cuda'"], ["workload.autocast == true"], ["device.type == 'cuda'"], ["workload.autocast == false"], False),
        (["metrics.idle_fraction >= 0.1"], [], ["device.type == 'cuda'"], ["metrics.idle_fraction >= 0.05"], True),
        (["metrics.idle_fraction >= 0.1"], [], ["device.type == 'cuda'"], ["metrics.idle_fraction >= 0.5"], False),
    ],
)
def test_mutually_exclusive(tmp_path, a_when, a_unless, b_when, b_unless, exclusive):
    def mk(code, when, unless):
        return R.Rule(code=code, name=code.lower(), title="t", family="precision",
                      conditions=[R.parse_condition(c) for c in when], transform=None, params={},
                      safety="safe", doc="", path=tmp_path / f"{code}-x.md",
                      unless=[R.parse_condition(c) for c in unless])

    a, b = mk("AO101", a_when, a_unless), mk("AO102", b_when, b_unless)
    assert R.mutually_exclusive(a, b) is exclusive
    assert R.mutually_exclusive(b, a) is exclusive
    if not exclusive:
        return
    # brute-force cross-check over the literals: no fact dict fires both
    fields = {c.field for c in a.conditions + a.unless + b.conditions + b.unless}
    values = {"device.type": ["cuda", "cpu", None], "device.bf16": [True, False, None],
              "workload.autocast": [True, False, None],
              "metrics.idle_fraction": [0.0, 0.05, 0.1, 0.2, 0.3, 0.4, 0.45, 0.5, 0.6, 1.0, None]}
    import itertools
    names = sorted(fields)
    for combo in itertools.product(*(values[n] for n in names)):
        facts = dict(zip(names, combo))
        assert not (a.fires(facts) and b.fires(facts)), facts


def test_directory_errors(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        R.load_rules(tmp_path / "missing")
    with pytest.raises(UserError, match="holds no AO###-slug.md files"):
        R.load_rules(tmp_path)
    (tmp_path / "README.md").write_text("not a rule")
    with pytest.raises(UserError, match="holds no AO###-slug.md files"):
        R.load_rules(tmp_path)


def test_rules_dir_prefers_package(tmp_path, monkeypatch):
    pkg = tmp_path / "site" / "autoopt"
    (pkg / "rules").mkdir(parents=True)
    (tmp_path / "site" / "rules").mkdir()
    write_rule(tmp_path / "site" / "rules")
    monkeypatch.setattr(R, "_PACKAGE_DIR", pkg)
    # empty package dir: the checkout's rules/
    assert R.rules_dir() == tmp_path / "site" / "rules"
    write_rule(pkg / "rules")
    assert R.rules_dir() == pkg / "rules"
    monkeypatch.setattr(R, "_PACKAGE_DIR", tmp_path / "nowhere" / "autoopt")
    with pytest.raises(UserError, match="No rule files were found"):
        R.rules_dir()


def test_rules_dir_in_checkout():
    d = R.rules_dir()
    assert d == Path(__file__).resolve().parents[1] / "rules"


def test_wheel_ships_rules():
    import tomllib

    pyproject = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())
    force = pyproject["tool"]["hatch"]["build"]["targets"]["wheel"]["force-include"]
    assert force.get("rules") == "autoopt/rules"


# --------------------------------------------------------------------------- evaluation


@pytest.fixture
def lib(tmp_path) -> list[R.Rule]:
    write_rule(
        tmp_path,
        when="[\"device.type == 'cuda'\", \"metrics.fp32_matmul_fraction >= 0.3\"]",
        unless="[\"workload.autocast == true\"]",
        message='"{metrics.fp32_matmul_fraction:.0%} of matmul time in fp32 on {device.name}"',
        gain='{ shares = ["metrics.kernel_fraction", "metrics.fp32_matmul_fraction"], removable = 0.5 }',
    )
    write_rule(
        tmp_path,
        code='"AO601"', name='"sync"', transform=None, params=None, safety='"manual"',
        when="[\"metrics.sync_count_per_step >= 1\"]",
        message='"{metrics.sync_count_per_step:.0f} syncs"',
        locations='"metrics.sync_sites"',
    )
    return R.load_rules(tmp_path)


def test_evaluate_fires_with_evidence_message_and_gain(lib):
    facts = {
        "device.type": "cuda",
        "device.name": "NVIDIA A100",
        "metrics.fp32_matmul_fraction": 0.8,
        "metrics.kernel_fraction": 0.5,
        "metrics.step_time_ms": 100.0,
        "workload.autocast": False,
        "metrics.idle_fraction": 0.3,  # read by no rule: not evidence
    }
    [f] = R.evaluate(lib, facts)
    assert isinstance(f, Finding)
    assert (f.code, f.name, f.title, f.transform, f.params, f.safety, f.family) == (
        "AO101", "test-rule", "A test rule", "amp", {"dtype": "bfloat16"}, "unsafe", "precision")
    assert f.evidence == {
        "device.type": "cuda",
        "metrics.fp32_matmul_fraction": 0.8,
        "workload.autocast": False,
        "device.name": "NVIDIA A100",
        "metrics.kernel_fraction": 0.5,
        "metrics.step_time_ms": 100.0,
    }
    assert f.message == "80% of matmul time in fp32 on NVIDIA A100"
    saved = 0.5 * 0.8 * 0.5
    assert f.expected_speedup == pytest.approx(1 / (1 - saved))
    assert f.predicted_step_time_ms == pytest.approx(100.0 * (1 - saved))
    j = f.to_json()
    assert {"code", "title", "message", "evidence", "safety", "expected_speedup"} <= set(j)
    json.dumps(j)


def test_evaluate_none_and_missing_facts(lib):
    base = {"device.type": "cuda", "metrics.fp32_matmul_fraction": 0.8}
    assert [f.code for f in R.evaluate(lib, base)] == ["AO101"]
    assert R.evaluate(lib, {**base, "metrics.fp32_matmul_fraction": None}) == []
    assert R.evaluate(lib, {"device.type": "cuda"}) == []
    assert R.evaluate(lib, {}) == []
    # unless on a known true fact silences; unknown (None) does not
    assert R.evaluate(lib, {**base, "workload.autocast": True}) == []
    assert [f.code for f in R.evaluate(lib, {**base, "workload.autocast": None})] == ["AO101"]
    [f] = R.evaluate(lib, base)
    # gain facts missing -> no estimate rather than an invented one; placeholders say unknown
    assert f.expected_speedup is None and f.predicted_step_time_ms is None
    assert f.message == "80% of matmul time in fp32 on unknown"
    assert "workload.autocast" not in f.evidence and "device.name" not in f.evidence


def test_evaluate_speedup_without_step_time(lib):
    [f] = R.evaluate(lib, {"device.type": "cuda", "metrics.fp32_matmul_fraction": 1.0, "metrics.kernel_fraction": 1.0})
    assert f.expected_speedup == pytest.approx(2.0)
    assert f.predicted_step_time_ms is None


def test_evaluate_locations(lib):
    [f] = R.evaluate(lib, {"metrics.sync_count_per_step": 3})
    assert f.message == "3 syncs" and f.transform is None and f.params == {}
    sites = [f"train.py:{n} aten::item" for n in range(10, 17)]
    [f] = R.evaluate(lib, {"metrics.sync_count_per_step": 3, "metrics.sync_sites": sites})
    assert f.evidence["metrics.sync_sites"] == sites
    assert f.message.startswith("3 syncs (at train.py:10 aten::item, ")
    assert f.message.endswith("and 2 more)")


def test_evaluate_is_sorted_and_independent(lib):
    facts = {"device.type": "cuda", "metrics.fp32_matmul_fraction": 0.5, "metrics.sync_count_per_step": 2}
    assert [f.code for f in R.evaluate(lib, facts)] == ["AO101", "AO601"]
    assert [f.code for f in R.evaluate(list(reversed(lib)), facts)] == ["AO601", "AO101"]


# --------------------------------------------------------------------------- gain


def test_gain_shares_and_complements():
    spec = {"shares": ["metrics.communication_fraction"], "complements": ["metrics.comm_overlap_fraction"], "removable": 1.0}
    s, t = gain.predict(spec, {"metrics.communication_fraction": 0.4, "metrics.comm_overlap_fraction": 0.5,
                               "metrics.step_time_ms": 50.0})
    assert s == pytest.approx(1 / 0.8) and t == pytest.approx(40.0)
    assert gain.fact_names(spec) == ["metrics.communication_fraction", "metrics.comm_overlap_fraction", "metrics.step_time_ms"]


@pytest.mark.parametrize(
    "facts",
    [
        {},
        {"metrics.dataloader_fraction": None},
        {"metrics.dataloader_fraction": 1.2},  # not a fraction
        {"metrics.dataloader_fraction": -0.1},
        {"metrics.dataloader_fraction": float("nan")},
        {"metrics.dataloader_fraction": True},
        {"metrics.dataloader_fraction": "0.5"},
        {"metrics.dataloader_fraction": 1.0},  # would save the whole step: no finite estimate
    ],
)
def test_gain_no_estimate(facts):
    spec = {"shares": ["metrics.dataloader_fraction"], "removable": 1.0}
    assert gain.predict(spec, {**facts, "metrics.step_time_ms": 10.0}) == (None, None)


def test_gain_empty_spec():
    assert gain.predict({}, {"metrics.step_time_ms": 10.0}) == (None, None)
    assert gain.fact_names({}) == []


def test_gain_bad_step_time():
    spec = {"shares": ["metrics.dataloader_fraction"], "removable": 1.0}
    s, t = gain.predict(spec, {"metrics.dataloader_fraction": 0.5, "metrics.step_time_ms": 0})
    assert s == pytest.approx(2.0) and t is None


def test_gain_batch_size():
    spec = {"model": "batch_size", "memory_budget": 0.9}
    # utilisation bound: 1 / 0.25 = 4; memory bound: 0.9 / 0.1 = 9
    s, t = gain.predict(spec, {"metrics.gpu_utilization": 0.25, "metrics.memory_fraction": 0.1, "metrics.step_time_ms": 80.0})
    assert s == pytest.approx(4.0) and t == pytest.approx(20.0)
    # memory bound smaller: 0.9 / 0.45 = 2
    s, _ = gain.predict(spec, {"metrics.gpu_utilization": 0.25, "metrics.memory_fraction": 0.45})
    assert s == pytest.approx(2.0)
    # never below 1
    s, _ = gain.predict(spec, {"metrics.gpu_utilization": 0.95, "metrics.memory_fraction": 0.95})
    assert s == 1.0
    assert gain.predict(spec, {"metrics.gpu_utilization": 0.0, "metrics.memory_fraction": 0.1}) == (None, None)
    assert gain.predict(spec, {"metrics.gpu_utilization": 0.5}) == (None, None)


def test_gain_rank_skew():
    s, t = gain.predict({"model": "rank_skew"}, {"metrics.rank_step_skew": 0.25, "metrics.step_time_ms": 125.0})
    assert s == pytest.approx(1.25) and t == pytest.approx(100.0)
    assert gain.predict({"model": "rank_skew"}, {"metrics.rank_step_skew": -1}) == (None, None)


def test_gain_speedup_is_monotone_in_share():
    spec = {"shares": ["metrics.idle_fraction"], "removable": 0.5}
    prev = 1.0
    for x in [0.0, 0.1, 0.3, 0.6, 0.9, 1.0]:
        s, _ = gain.predict(spec, {"metrics.idle_fraction": x})
        assert s is not None and s >= prev and math.isfinite(s)
        prev = s


# --------------------------------------------------------------------------- lookup and rendering


def test_get_rule(lib):
    assert R.get_rule("AO101", lib).code == "AO101"
    assert R.get_rule("ao601", lib).code == "AO601"
    assert R.get_rule("sync", lib).code == "AO601"
    with pytest.raises(UserError) as exc:
        R.get_rule("AO102", lib)
    assert "There is no rule 'AO102'" in exc.value.message and "AO101" in exc.value.message
    assert "autoopt rules" in exc.value.message
    with pytest.raises(UserError, match="test-rule"):
        R.get_rule("test-rul", lib)


def test_get_rule_default_library():
    r = R.get_rule("AO101")
    assert r.transform == "amp"
    with pytest.raises(UserError, match="Did you mean"):
        R.get_rule("AO1010")


def test_render_rules_table(lib):
    text = render_rules_table(lib)
    lines = text.splitlines()
    assert lines[0].split() == ["CODE", "NAME", "TRANSFORM", "SAFETY", "TITLE"]
    assert any(ln.startswith("AO101  test-rule") and "amp" in ln and "unsafe" in ln for ln in lines)
    assert any(ln.startswith("AO601") and "(advice)" in ln for ln in lines)
    assert "AO1xx precision" in text and "AO6xx host-device synchronisation" in text
    assert "2 rules in 2 families" in text


def test_render_explain(lib):
    text = render_explain(lib[0])
    assert text.startswith("# test-rule (AO101)\n")
    assert "transform `amp` (dtype=bfloat16), safety unsafe" in text
    assert "`device.type == 'cuda'`" in text and "Silent when any holds: `workload.autocast == true`" in text
    for s in R.SECTIONS:
        assert s in text
    advice = render_explain(lib[1])
    assert "none automatic (advice only)" in advice


def test_launch_overhead_gain_keeps_a_gap_per_replayed_kernel():
    from autoopt.diagnosis.predicted_gain import predict, validate

    spec = {"model": "launch_overhead", "gap_us": 2.0, "complements": ["metrics.dataloader_fraction"]}
    validate(spec)
    facts = {"metrics.step_time_ms": 2.3, "metrics.host_wait_fraction": 0.77, "metrics.kernels_per_step": 74,
             "metrics.dataloader_fraction": 0.0}
    # by hand: 2.3 ms x 0.77 host wait = 1.771 ms; 74 kernels x 2 us = 0.148 ms stay; 2.3 - 1.623 = 0.677 ms
    speedup, step = predict(spec, facts)
    assert step == pytest.approx(0.677)
    assert speedup == pytest.approx(2.3 / 0.677)
    # a step whose host wait is all kernel gaps has nothing to gain
    assert predict(spec, dict(facts, **{"metrics.kernels_per_step": 2000}))[0] == pytest.approx(1.0)
    assert predict(spec, dict(facts, **{"metrics.kernels_per_step": None})) == (None, None)
    with pytest.raises(ValueError):
        validate({"model": "launch_overhead", "gap_us": -1})
