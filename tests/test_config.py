"""Config loading: typing, one-line errors naming the closest key, overrides, base inheritance."""
import re

import pytest

from bionets.config import apply_overrides, load_config, merge
from bionets.configbase import load_yaml
from bionets.errors import BionetsError


def test_default_config_loads_and_overrides_apply():
    cfg = load_config(None, ["train.epochs=3", "optim.lr=0.05", "data.batch_size=32"])
    assert cfg.name == "digits" and cfg.data.name == "digits"
    assert (cfg.train.epochs, cfg.optim.lr, cfg.data.batch_size) == (3, 0.05, 32)


@pytest.mark.parametrize("override, expected", [
    ("train.epoch=3", "unknown config key 'train.epoch' (did you mean: epochs?)"),
    ("trian.epochs=2", "unknown config key 'trian' (did you mean: train"),
    ("optim.lr=-1", "config key 'optim.lr'"),
    ("train.amp=fp32", "config key 'train.amp'"),
    ("train.compile=fast", "config key 'train.compile': Input should be a valid boolean"),
    ("train.channels_last=maybe", "or Input should be 'auto' (got 'maybe')"),
    ("data.batch_size=many", "config key 'data.batch_size'"),
    ("data.auto_augment=rand-m9-mstd0.5-inc", "section 'inc' has no value, and timm would skip it"),
    # no pydantic type tags in the key (it read 'placement.list[str].0')
    ("mechanisms.quadratic.placement=[1]", "config key 'mechanisms.quadratic.placement.0': Input should be a valid string"),
    ("mechanisms.quadratic.placement=autoo", "'mechanisms.quadratic.placement': Input should be a valid list; or Input "
                                             "should be 'auto' (got 'autoo')"),
    ("mechanisms.nosuch.x=1", "unknown mechanism 'nosuch'"),
    ("mechanisms={raa: {}, raa: {weight: 1}}", "override 'mechanisms={raa: {}, raa: {weight: 1}}': key 'raa' appears twice"),
    ("mechanisms={gradr: {}}", "mechanisms.gradr trains with optim.name=gradr, got optim.name=sgd: set optim.name=gradr"),
    ("epochs", "must look like key=value"),
    # bounds the libraries would otherwise enforce with a traceback, or not at all
    ("optim.betas=[2, -1]", "config key 'optim.betas.0': Input should be less than 1 (got 2)"),
    ("train.seed=99999999999999999999", "config key 'train.seed': Input should be less than 9223372036854775808"),
    ("sched.milestones=[-5, 0]", "config key 'sched.milestones.0': Input should be greater than or equal to 1"),
    ("sched.decay_rate=100", "config key 'sched.decay_rate': Input should be less than or equal to 1"),
    ("sched.min_lr=10", "sched.min_lr=10 is above optim.lr=0.1: the schedule would raise the rate"),
    ("train.epochs=true", "config key 'train.epochs': takes a number, not true or false (got True)"),
    ("mechanisms.arr.weight=false", "config key 'mechanisms.arr.weight': takes a number, not true or false"),
    ("train.clip_grad=true", "config key 'train.clip_grad': takes a number, not true or false"),
    ("name=../../escape", "config key 'name': must name a directory under out_dir (no '..', not an absolute path)"),
    ("name=" + "a" * 300, "config key 'name': has a folder name over 255 bytes"),
    ("name=./", "config key 'name': must name a directory under out_dir, not out_dir itself"),   # (it wrote there)
    ("foo=1", "unknown config key 'foo' (valid here: name, out_dir, model, data, optim, sched, train, mechanisms, "
              "resume)"),
    # paths the OS refuses, or that split the one-line messages: ValueError, RuntimeError, OSError before
    ('name="a\\0b"', "config key 'name': holds a NUL byte, which no path can hold"),
    ('out_dir="a\\nb"', "config key 'out_dir': holds a line break: give the path on one line (got 'a\\nb')"),
    ("data.root=~nosuchuser/x", "config key 'data.root': starts with '~nosuchuser', and no such user has a home folder"),
    pytest.param("model.init=" + "x/" * 2100, "config key 'model.init': is 4,200 bytes long, more than paths may be: "
                 "shorten it (got 'x/x/", id="long-init"),
    pytest.param("out_dir=" + "x/" * 1998, "out_dir/name is 4,002 bytes long", id="long-run-dir"),   # (each fine)
])
def test_bad_config_is_one_line(override, expected):
    with pytest.raises(BionetsError) as err:
        load_config(None, [override])
    assert expected in str(err.value) and "\n" not in str(err.value)


def test_a_checkpoint_or_binary_file_given_as_config_is_one_line(tmp_path):
    """A checkpoint passed where a config goes (bionets train runs/x/last.pt) says how to resume it."""
    from bionets.engine.checkpoint import save_checkpoint
    save_checkpoint(tmp_path / "last.pt", {"config": {}, "model": {}})
    (tmp_path / "binary.yaml").write_bytes(bytes([0x80, 0x81, 0xff]))
    for path, expected in ((tmp_path / "last.pt", f"is a checkpoint, not a YAML config: continue its run with "
                                                  f"'bionets train --resume {tmp_path / 'last.pt'}'"),
                           (tmp_path / "binary.yaml", "is not a text file")):
        with pytest.raises(BionetsError) as err:
            load_config(str(path))
        assert expected in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("kwargs, expected", [
    ("{foo: 1}", "optim.kwargs {'foo': 1} does not fit the sgd optimizer"),
    ("{lr: 0.5}", "optim.kwargs sets lr, which bionets sets itself (from optim.lr, optim.weight_decay"),
])
def test_optimizer_options_it_does_not_take_are_one_line(kwargs, expected):
    from torch import nn

    from bionets.engine.optim import create_optimizer
    with pytest.raises(BionetsError, match=re.escape(expected)):
        create_optimizer(nn.Linear(2, 2), load_config(None, [f"optim.kwargs={kwargs}"]).optim)


def test_compile_takes_a_switch_or_a_torch_compile_mode():
    assert load_config(None, ["train.compile=true"]).train.compile is True
    assert load_config(None, ["train.compile=reduce-overhead"]).train.compile == "reduce-overhead"
    assert load_config(None, []).train.compile is False


def test_unknown_config_name_suggests_nearest():
    with pytest.raises(BionetsError, match="did you mean: digits"):
        load_config("digit")


def test_base_inheritance_and_deep_merge(tmp_path):
    (tmp_path / "base.yaml").write_text("name: b\ntrain: {epochs: 7, seed: 3}\noptim: {lr: 0.2}\n")
    (tmp_path / "child.yaml").write_text("base: base\ntrain: {epochs: 2}\n")
    cfg = load_config(str(tmp_path / "child.yaml"))
    assert (cfg.train.epochs, cfg.train.seed, cfg.optim.lr) == (2, 3, 0.2)
    assert cfg.name == "child"          # its own: the base's name would share (and overwrite) the base's run directory
    (tmp_path / "loop.yaml").write_text("base: loop\n")
    with pytest.raises(BionetsError, match="inherits from itself"):
        load_config(str(tmp_path / "loop.yaml"))


def test_invalid_yaml_is_one_line(tmp_path):
    (tmp_path / "bad.yaml").write_text("train: {epochs: [1,\n")
    with pytest.raises(BionetsError, match="not valid YAML"):
        load_config(str(tmp_path / "bad.yaml"))


def test_merge_and_overrides_do_not_mutate():
    base = {"a": {"b": 1, "c": 2}}
    assert merge(base, {"a": {"b": 5}}) == {"a": {"b": 5, "c": 2}} and base["a"]["b"] == 1
    assert apply_overrides(base, ["a.d.e=[1, 2]"])["a"]["d"]["e"] == [1, 2] and "d" not in base["a"]


def test_a_mapping_override_that_drops_keys_says_which():
    """'model.kwargs={hidden: 32}' on dnrt/digits replaced the mapping and silently dropped its
    img_size and act_layer (a documented example then trained another model than meant)."""
    cfg = load_config("dnrt/digits", ["model.kwargs={hidden: 32}", "model.kwargs.act_layer=relu"])
    assert cfg.model.kwargs == {"hidden": 32, "act_layer": "relu"}
    assert cfg._notes == ["note: the override model.kwargs={...} replaces that whole mapping, so it drops img_size, "
                          "act_layer; to change one entry, use model.kwargs.KEY=VALUE"]
    assert load_config("dnrt/digits", ["model.kwargs.hidden=32"])._notes == []
    assert load_config("dnrt/digits", ["model.kwargs={img_size: 8, act_layer: gelu, hidden: 7}"])._notes == []
    # a mechanism given true or null takes its defaults, not the settings the config had (D 0.3 -> 1)
    cfg = load_config("stds/digits_sine", ["mechanisms.stds=true"])
    assert cfg.mechanisms["stds"].d_max == 1.0 and cfg._notes == [
        "note: the override mechanisms.stds=true replaces that whole mapping, so it drops sparse_function, schedule, "
        "d_max; to change one entry, use mechanisms.stds.KEY=VALUE"]


def test_a_base_is_found_beside_the_config_that_names_it(tmp_path, monkeypatch):
    """cifar100/dit_resnet20 builds on the bundled cifar100/resnet20: a resnet20.yaml in the current
    folder (the user's, or configs/cifar10/) must not replace it (it silently trained CIFAR-10)."""
    (tmp_path / "resnet20.yaml").write_text("name: mine\ndata: {name: digits}\ntrain: {epochs: 3}\n")
    monkeypatch.chdir(tmp_path)
    cfg = load_config("cifar100/dit_resnet20")
    assert (cfg.data.name, cfg.train.epochs, cfg.model.name) == ("cifar100", 160, "dit_resnet20")
    assert load_config("resnet20").name == "mine"                     # a top-level name: the user's file first
    (tmp_path / "odd.yaml").write_text("base: [resnet20]\n")
    with pytest.raises(BionetsError, match="base must name one config"):
        load_config(str(tmp_path / "odd.yaml"))
    (tmp_path / "odd.yaml").write_text("base: dnrt/digit\n")          # the file that names it, not a top-level one
    with pytest.raises(BionetsError, match=f"config '{tmp_path / 'odd.yaml'}': its base 'dnrt/digit' names no config "
                                           r"file .*\(did you mean: dnrt/digits"):
        load_config(str(tmp_path / "odd.yaml"))


def test_scientific_numbers_without_a_dot_are_numbers_everywhere():
    """YAML 1.1 reads 1e-3 as a string: typed fields converted it, free-form dicts passed it on."""
    cfg = load_config(None, ["model.kwargs={drop_rate: 1e-1, width: 64}", "optim.kwargs={trust_coeff: 1e-3}",
                             "optim.lr=2e-2"])
    assert cfg.model.kwargs["drop_rate"] == 0.1 and cfg.optim.kwargs["trust_coeff"] == 0.001 and cfg.optim.lr == 0.02
    assert load_config(None, ["name=1e3x"]).name == "1e3x"


def test_lr_multipliers_may_freeze_but_not_ascend(tmp_path):
    with pytest.raises(BionetsError, match="optim.lr_mult"):
        load_config(None, ["optim.lr_mult={'*': -1}"])
    from bionets.engine.trainer import base_rate
    assert base_rate([{"lr": 0.0, "lr_scale": 0.0}, {"lr": 0.05, "lr_scale": 0.5}]) == 0.1


def test_a_saved_config_reads_back_the_same(tmp_path):
    """config.yaml is written so that the config reader gives it back: a string such as '1e5' is
    quoted (the reader takes 1e5 for a number)."""
    from bionets.configbase import dump_yaml, load_yaml
    cfg = load_config(None, ["name='1e5'", "model.kwargs={tag: '2e3', drop_rate: 1e-1}"])
    assert load_yaml(dump_yaml(cfg.to_dict())) == cfg.to_dict() and cfg.name == "1e5"


def test_a_key_given_twice_in_a_config_file_is_one_line(tmp_path):
    """PyYAML keeps the last of two equal keys silently: a second train: section replaced the first whole."""
    (tmp_path / "twice.yaml").write_text("train:\n  epochs: 3\noptim: {lr: 0.1}\ntrain:\n  amp: 'off'\n")
    with pytest.raises(BionetsError, match=re.escape("is not valid YAML at line 4 (key 'train' appears twice (the "
                                                     "second would replace the first)): fix the file")):
        load_config(str(tmp_path / "twice.yaml"))
    assert load_yaml("a: &x {b: 1}\nc:\n  <<: *x\n  d: 2\n") == {"a": {"b": 1}, "c": {"b": 1, "d": 2}}   # merges stay


def test_a_list_as_a_key_is_one_line(tmp_path):
    """YAML allows a list as a key (``? [a, b]``); the duplicate-key check hashed it: a TypeError."""
    (tmp_path / "listkey.yaml").write_text("? [a, b]\n: 1\n")
    with pytest.raises(BionetsError, match=re.escape("is not valid YAML at line 1 (a key is a list (['a', 'b']); keys "
                                                     "are names): fix the file")):
        load_config(str(tmp_path / "listkey.yaml"))
    with pytest.raises(BionetsError, match=re.escape("override 'model.kwargs={[a]: 1}': a key is a list")):
        load_config(None, ["model.kwargs={[a]: 1}"])


def test_another_librarys_error_in_one_line_cuts_at_a_space():
    """Cut at 120 characters, torch's 'you tried to allocate 80000000000 bytes' read '... allocate
    80000000)': a wrong number. The cut is at a space and says so."""
    from bionets.errors import one_line
    err = RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 80000000000 bytes. "
                       "Error code 12 (Cannot allocate memory)\nsecond line")
    assert one_line(err, 70) == "RuntimeError: DefaultCPUAllocator: can't allocate memory: you tried to allocate ..."
    assert one_line(err) == "RuntimeError: " + str(err).splitlines()[0]
    assert one_line(RuntimeError("")) == "RuntimeError"


def test_an_unknown_name_lists_the_choices_once():
    from bionets.errors import unknown
    names = ["dnrt_seeds", "eigen", "gaussian"]
    assert str(unknown("experiment", "nosuch", names, see="experiments: ...")) == (
        "unknown experiment 'nosuch' (valid: dnrt_seeds, eigen, gaussian)")        # not the list twice
    assert str(unknown("experiment", "gausian", names, see="experiments: all")) == (
        "unknown experiment 'gausian' (did you mean: gaussian?); experiments: all")
    many = [f"m{i:02d}" for i in range(13)]
    assert str(unknown("model", "zz", many, see="bionets models")).endswith("m11, ...); bionets models")


def test_a_section_built_in_python_errs_in_one_line():
    """docs/stds.md builds OptimConfig(name="gradr", lr=1e-3) in Python: a bad value there gave
    pydantic's three-line ValidationError."""
    from bionets.engine.optim import OptimConfig
    with pytest.raises(BionetsError, match=re.escape("config key 'lr': Input should be greater than 0 (got -1)")):
        OptimConfig(lr=-1)
    with pytest.raises(BionetsError, match=re.escape("unknown config key 'lrr' (did you mean: lr, lr_mult?)")):
        OptimConfig(lrr=1)
    assert OptimConfig(name="gradr", lr=1e-3).lr == 1e-3


def test_any_timm_optimizer_takes_the_options_it_has():
    """optim.name is any of timm's optimizers: momentum goes to those that have one, betas and eps to
    those that have them where the config sets them (else the optimizer's own: Lamb's eps 1e-6)."""
    from torch import nn

    from bionets.engine.optim import create_optimizer, sgd_like
    made = {name: create_optimizer(nn.Linear(2, 2), load_config(None, [f"optim.name={name}", *extra]).optim)
            for name, extra in (("lion", ["optim.betas=[0.8, 0.9]"]), ("lamb", []), ("madgrad", ["optim.eps=1e-4"]),
                                ("rmsprop", ["optim.momentum=0.5"]))}
    assert type(made["lion"]).__name__ == "Lion" and made["lion"].defaults["betas"] == (0.8, 0.9)
    assert made["lamb"].defaults["eps"] == 1e-6 and made["lamb"].defaults["betas"] == (0.9, 0.999)
    assert made["madgrad"].defaults["eps"] == 1e-4 and made["madgrad"].defaults["momentum"] == 0.9
    assert made["rmsprop"].defaults["momentum"] == 0.5
    assert [n for n in ("sgd", "nesterov", "lars", "sgdw", "adamw", "rmsprop", "lion") if sgd_like(n)] == [
        "sgd", "nesterov", "lars", "sgdw"]
    with pytest.raises(BionetsError, match=r"unknown optimizer 'lino' \(did you mean: lion"):
        create_optimizer(nn.Linear(2, 2), load_config(None, ["optim.name=lino"]).optim)
    # Adan's three betas; a second-order optimizer (its step needs create_graph); names in any case
    with pytest.raises(BionetsError, match=r"optim.betas=\[0.9, 0.99\]: the adan optimizer takes 3 betas"):
        create_optimizer(nn.Linear(2, 2), load_config(None, ["optim.name=adan", "optim.betas=[0.9, 0.99]"]).optim)
    assert create_optimizer(nn.Linear(2, 2), load_config(None, ["optim.name=adan", "optim.betas=[0.9, 0.9, 0.99]"]
                                                         ).optim).defaults["betas"] == (0.9, 0.9, 0.99)
    with pytest.raises(BionetsError, match="optim.name=adahessian is a second-order optimizer"):
        create_optimizer(nn.Linear(2, 2), load_config(None, ["optim.name=adahessian"]).optim)
    upper = create_optimizer(nn.Linear(2, 2), load_config(None, ["optim.name=SGD", "optim.nesterov=false"]).optim)
    assert type(upper).__name__ == "SGD" and upper.defaults["nesterov"] is False         # bionets' sgd, not timm's
