"""The bigexec config file (``bigexec.config``) and the ``ec2`` system's ``[ec2]`` table:
where the file is looked for, precedence (keyword > variable > file > default), and every
error naming the file, the table and the key."""

from __future__ import annotations

import sys
import types

import pytest

from bigexec.config import Config, ConfigError, config_path, load_config
from bigexec.systems.ec2 import Ec2Options

EVERY_OPTION = """\
system = "ec2"

[ec2]
instance_type = "m6i.large"
region = "eu-west-1"
market = "on-demand"
spot_only = true
alternatives = ["m5.large", "subnet-b"]
subnet = "subnet-a"
security_groups = ["sg-1", "sg-2"]
instance_profile = "bigexec-role"
key_name = "k1"
root_volume_gib = 64
ami = "ami-123"
procs_per_instance = 3
tags = { team = "x", a = "b" }
endpoint_url = "http://127.0.0.1:1"

[local]
anything = "is the local system's to check"
"""


def refusal(call, *args, **kwargs) -> str:
    """The message of the ConfigError that ``call`` raises."""
    with pytest.raises(ConfigError) as caught:
        call(*args, **kwargs)
    return str(caught.value)


def write(tmp_path, text: str, name: str = "config.toml"):
    path = tmp_path / name
    path.write_text(text)
    return path


# ── where the file is ────────────────────────────────────────────────────────────────────

def test_bigexec_config_names_the_file_over_xdg(tmp_path):
    env = {"BIGEXEC_CONFIG": str(tmp_path / "mine.toml"), "XDG_CONFIG_HOME": "/elsewhere",
           "HOME": "/home/nobody"}
    assert config_path(env) == tmp_path / "mine.toml"


def test_xdg_config_home_then_home(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert config_path({"XDG_CONFIG_HOME": str(tmp_path / "xdg")}) == (
        tmp_path / "xdg" / "bigexec" / "config.toml")
    home_file = tmp_path / "home" / ".config" / "bigexec" / "config.toml"
    assert config_path({}) == home_file
    # blank variables are not set; a relative XDG_CONFIG_HOME is invalid (XDG spec): ignored
    assert config_path({"BIGEXEC_CONFIG": " ", "XDG_CONFIG_HOME": "rel/dir"}) == home_file


def test_the_default_file_is_read_through_the_environment(tmp_path, monkeypatch):
    xdg = tmp_path / "xdg"
    (xdg / "bigexec").mkdir(parents=True)
    write(xdg / "bigexec", '[ec2]\ninstance_type = "from-xdg"\n')
    named = write(tmp_path, '[ec2]\ninstance_type = "from-bigexec-config"\n', "named.toml")
    # environ=None: os.environ, for both the variables and the file's place
    monkeypatch.setenv("XDG_CONFIG_HOME", str(xdg))
    monkeypatch.delenv("BIGEXEC_CONFIG", raising=False)
    monkeypatch.delenv("BIGEXEC_EC2_INSTANCE_TYPE", raising=False)
    assert Ec2Options.from_env().instance_type == "from-xdg"
    monkeypatch.setenv("BIGEXEC_CONFIG", str(named))
    assert Ec2Options.from_env().instance_type == "from-bigexec-config"
    # an environ mapping passed in is where the file is looked up too
    assert Ec2Options.from_env({"XDG_CONFIG_HOME": str(xdg)}).instance_type == "from-xdg"


def test_a_missing_file_is_an_empty_config(tmp_path):
    missing = tmp_path / "nope.toml"
    loaded = load_config(None, {"BIGEXEC_CONFIG": str(missing)})
    assert (loaded.source, dict(loaded.document), loaded.system) == (str(missing), {}, None)
    assert Ec2Options.from_env({}, config=missing) == Ec2Options()


# ── what the file holds ──────────────────────────────────────────────────────────────────

def test_every_ec2_option_comes_from_the_file_with_its_toml_type(tmp_path):
    opts = Ec2Options.from_env({}, config=write(tmp_path, EVERY_OPTION))
    assert opts == Ec2Options(
        instance_type="m6i.large", region="eu-west-1", market="on-demand", spot_only=True,
        alternatives=("m5.large", "subnet-b"), subnet="subnet-a",
        security_groups=("sg-1", "sg-2"), instance_profile="bigexec-role", key_name="k1",
        root_volume_gib=64, ami="ami-123", procs_per_instance=3,
        tags={"team": "x", "a": "b"}, endpoint_url="http://127.0.0.1:1")
    # a path as text works as well as a Path
    assert Ec2Options.from_env({}, config=str(tmp_path / "config.toml")) == opts


def test_the_file_names_the_default_system(tmp_path):
    assert load_config(write(tmp_path, EVERY_OPTION)).system == "ec2"
    assert load_config(write(tmp_path, "[ec2]\n", "none.toml")).system is None
    assert load_config({"system": "threads"}).system == "threads"
    env = {"BIGEXEC_CONFIG": str(tmp_path / "config.toml")}
    assert load_config(None, env).system == "ec2"


def test_each_layer_beats_the_next(tmp_path):
    path = write(tmp_path, '[ec2]\ninstance_type = "file"\nregion = "file"\n'
                           'root_volume_gib = 50\ntags = { from = "file" }\n')
    env = {"BIGEXEC_EC2_INSTANCE_TYPE": "variable", "BIGEXEC_EC2_REGION": "variable",
           "BIGEXEC_EC2_MARKET": "on-demand"}
    opts = Ec2Options.from_env(env, config=path, instance_type="keyword")
    assert opts.instance_type == "keyword"  # keyword > variable > file
    assert opts.region == "variable"  # variable > file
    assert opts.root_volume_gib == 50 and opts.tags == {"from": "file"}  # file > default
    assert opts.market == "on-demand"  # variable > default
    assert opts.spot_only is Ec2Options().spot_only  # nothing set: the default
    # a keyword left at None, and a blank variable, are "not set": the next layer counts
    blank = {"BIGEXEC_EC2_INSTANCE_TYPE": " "}
    assert Ec2Options.from_env(blank, config=path, instance_type=None).instance_type == "file"


def test_a_mapping_is_a_parsed_file():
    opts = Ec2Options.from_env({}, config={"ec2": {"tags": {"k": "v"}, "spot_only": True}})
    assert (opts.tags, opts.spot_only) == ({"k": "v"}, True)
    with pytest.raises(ConfigError, match=r"<config mapping>: \[ec2\] unknown key 'typo'"):
        Ec2Options.from_env({}, config={"ec2": {"typo": 1}})


# ── errors ───────────────────────────────────────────────────────────────────────────────

def test_an_unknown_key_names_the_file_the_table_the_key_and_the_known_keys(tmp_path):
    path = write(tmp_path, '[ec2]\ninstance_tipe = "m5.large"\n')
    with pytest.raises(ConfigError) as caught:
        Ec2Options.from_env({}, config=path)
    message = str(caught.value)
    assert message.startswith(f"{path}: [ec2] unknown key 'instance_tipe'; known keys: ")
    assert "instance_type" in message and "security_groups" in message
    assert isinstance(caught.value, ValueError)  # as a bad variable's error is


def test_an_unknown_top_level_key_is_refused_and_other_tables_are_not_checked(tmp_path):
    path = write(tmp_path, 'sytem = "ec2"\n')
    message = refusal(load_config, path)
    assert message.startswith(f"{path}: unknown top-level key 'sytem' (string 'ec2'); "
                              f"known keys: system, and one table per system")
    # [local] is the local system's: the ec2 options do not look at it
    assert Ec2Options.from_env({}, config={"local": {"whatever": 1}}) == Ec2Options()


@pytest.mark.parametrize("line, expected", [
    ('root_volume_gib = "64"', "root_volume_gib must be an integer, not string '64'"),
    ("procs_per_instance = true", "procs_per_instance must be an integer, not boolean True"),
    ("root_volume_gib = 64.0", "root_volume_gib must be an integer, not float 64.0"),
    ('spot_only = "yes"', "spot_only must be a boolean, not string 'yes'"),
    ('alternatives = "m5.large"', "alternatives must be an array of strings, not string"),
    ('security_groups = ["sg-1", 2]', "security_groups must be an array of strings, not array"),
    ("tags = { cost = 5 }", "tags must be a table of strings, not table"),
    ("region = 1", "region must be a string, not integer 1"),
])
def test_a_value_of_the_wrong_type_names_the_expected_type(tmp_path, line, expected):
    path = write(tmp_path, f"[ec2]\n{line}\n")
    with pytest.raises(ConfigError) as caught:
        Ec2Options.from_env({}, config=path)
    assert str(caught.value).startswith(f"{path}: [ec2] {expected}")


def test_a_wrongly_typed_system_is_refused(tmp_path):
    path = write(tmp_path, "system = 1\n")
    assert refusal(load_config, path) == f"{path}: system must be a string, not integer 1"


@pytest.mark.parametrize("line, problem", [
    ("root_volume_gib = 0", "must be a positive integer, not 0"),
    ('market = "reserved"', "market must be 'spot' or 'on-demand'"),
    ('instance_type = ""', "instance_type must not be empty"),
])
def test_a_value_the_options_refuse_names_the_file_and_key(tmp_path, line, problem):
    path = write(tmp_path, f"[ec2]\n{line}\n")
    key = line.split()[0]
    with pytest.raises(ConfigError) as caught:
        Ec2Options.from_env({}, config=path)
    assert str(caught.value).startswith(f"{path}: [ec2] {key}: ")
    assert problem in str(caught.value)


def test_a_variable_over_a_bad_file_value_is_still_an_error_for_the_file(tmp_path):
    # The file is checked as a whole, so a typo cannot hide behind a variable set today.
    path = write(tmp_path, '[ec2]\nregion = 1\n')
    with pytest.raises(ConfigError, match=r"\[ec2\] region must be a string"):
        Ec2Options.from_env({"BIGEXEC_EC2_REGION": "eu-west-1"}, config=path)


def test_malformed_toml_names_the_file_line_and_column(tmp_path):
    path = write(tmp_path, '[ec2]\ninstance_type = "m5.large"\nregion = eu-west-1\n')
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    message = str(caught.value)
    assert message.startswith(f"{path}: not valid TOML: ")
    assert "line 3, column 10" in message


def test_text_that_is_not_utf8_names_the_file(tmp_path):
    path = tmp_path / "config.toml"
    path.write_bytes(b'[ec2]\nregion = "\xff"\n')
    assert refusal(load_config, path).startswith(f"{path}: not UTF-8 text")


def test_an_unreadable_file_names_it(tmp_path):
    directory = tmp_path / "config.toml"
    directory.mkdir()  # reading a directory fails for every user, root included
    message = refusal(load_config, None, {"BIGEXEC_CONFIG": str(directory)})
    assert message.startswith(f"cannot read the bigexec config file {directory}: ")
    with pytest.raises(ConfigError, match="cannot read"):
        Ec2Options.from_env({"BIGEXEC_CONFIG": str(directory)})


# ── Python 3.10: tomli, or a clear error ─────────────────────────────────────────────────

def without_tomllib(monkeypatch, tomli: types.ModuleType | None) -> None:
    # None in sys.modules makes ``import`` raise ModuleNotFoundError, as on 3.10.
    monkeypatch.setitem(sys.modules, "tomllib", None)
    monkeypatch.setitem(sys.modules, "tomli", tomli)


def test_without_tomllib_tomli_parses_the_file(tmp_path, monkeypatch):
    parsed: list[str] = []
    tomli = types.ModuleType("tomli")  # stands in for the package, on any Python

    def loads(text: str) -> dict:
        parsed.append(text)
        return {"ec2": {"key_name": "k9"}}

    class TOMLDecodeError(ValueError):
        pass

    tomli.loads = loads  # type: ignore[attr-defined]
    tomli.TOMLDecodeError = TOMLDecodeError  # type: ignore[attr-defined]
    without_tomllib(monkeypatch, tomli)
    path = write(tmp_path, '[ec2]\nkey_name = "k9"\n')
    assert Ec2Options.from_env({}, config=path).key_name == "k9"
    assert parsed == ['[ec2]\nkey_name = "k9"\n']


def test_without_any_toml_parser_only_an_existing_file_is_an_error(tmp_path, monkeypatch):
    without_tomllib(monkeypatch, None)
    assert Ec2Options.from_env({}, config=tmp_path / "missing.toml") == Ec2Options()
    assert Ec2Options.from_env({}, config={"ec2": {"key_name": "k"}}).key_name == "k"
    path = write(tmp_path, '[ec2]\nkey_name = "k9"\n')
    assert refusal(Ec2Options.from_env, {}, config=path) == (
        f"reading the bigexec config file {path} needs a TOML parser: on Python 3.10, "
        f"pip install tomli")


def test_config_is_a_plain_record():
    loaded = Config("somewhere", {"ec2": {"region": "r"}})
    assert loaded.section("ec2", {"region": str}) == {"region": "r"}
    assert loaded.section("local", {}) == {}


def test_start_uses_the_files_system_when_nothing_else_names_one(tmp_path, monkeypatch):
    import bigexec

    monkeypatch.delenv("BIGEXEC_SYSTEM", raising=False)
    path = write(tmp_path, 'system = "threads"\n')
    monkeypatch.setenv("BIGEXEC_CONFIG", str(path))
    with bigexec.start() as b:
        assert b.system.name == "threads"
    monkeypatch.setenv("BIGEXEC_SYSTEM", "local")  # the variable beats the file
    path.write_text('system = "no-such-system"\n')
    with bigexec.start() as b:
        assert b.system.name == "local"
    monkeypatch.delenv("BIGEXEC_SYSTEM")
    with bigexec.start("threads") as b:  # the argument beats both
        assert b.system.name == "threads"
