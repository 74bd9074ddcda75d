"""The ``ec2`` system's options: keywords over ``BIGEXEC_EC2_*`` variables (``Ec2Options``).
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from ...config import ConfigSource, load_config

__all__ = ["AMI_PARAMETERS", "DEFAULT_AMI_PARAMETER", "ENV_PREFIX", "Ec2Options",
           "default_ami_parameter"]

log = logging.getLogger("bigexec.systems.ec2")

ENV_PREFIX = "BIGEXEC_EC2_"
#: Stock images (python3 and cloud-init included) by the Python minor version they ship, as
#: their publishers name them in SSM's public parameters: pickled code needs the driver's
#: Python on the machines, so the default image is the one that has it.
AMI_PARAMETERS = {
    "3.10": "/aws/service/canonical/ubuntu/server/22.04/stable/current/amd64/hvm/ebs-gp2/ami-id",
    "3.11": "/aws/service/debian/release/12/latest/amd64",
    "3.12": "/aws/service/canonical/ubuntu/server/24.04/stable/current/amd64/hvm/ebs-gp3/ami-id",
    "3.13": "/aws/service/debian/release/13/latest/amd64",
}
#: Ubuntu 24.04 LTS: the image for a Python none of the others ships.
DEFAULT_AMI_PARAMETER = AMI_PARAMETERS["3.12"]


def default_ami_parameter(python: str | None = None) -> str:
    """The SSM parameter of the stock image whose python3 is ``python`` (major.minor; default
    this interpreter's), else of Ubuntu 24.04."""
    python = python or f"{sys.version_info[0]}.{sys.version_info[1]}"
    return AMI_PARAMETERS.get(python, DEFAULT_AMI_PARAMETER)


def _text(value: str) -> str:
    return value.strip()


def _words(value: str) -> tuple[str, ...]:
    return tuple(w.strip() for w in value.split(",") if w.strip())


def _flag(value: str) -> bool:
    word = value.strip().lower()
    if word in ("1", "true", "yes", "on"):
        return True
    if word in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(f"not a boolean: {value!r} (use 1/0, true/false, yes/no, on/off)")


def _positive(value: str) -> int:
    number = int(value)
    if number <= 0:
        raise ValueError(f"not a positive integer: {value!r}")
    return number


def _tag_pairs(value: str) -> dict[str, str]:
    tags = {}
    for pair in _words(value):
        key, sep, val = pair.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"not KEY=VALUE: {pair!r}")
        tags[key.strip()] = val.strip()
    return tags


#: How each BIGEXEC_EC2_<NAME> variable's text becomes the option's value.
_CONVERSIONS: dict[str, Callable[[str], Any]] = {
    "instance_type": _text, "region": _text, "market": _text, "spot_only": _flag,
    "alternatives": _words, "subnet": _text, "security_groups": _words,
    "instance_profile": _text, "key_name": _text, "root_volume_gib": _positive, "ami": _text,
    "procs_per_instance": _positive, "tags": _tag_pairs, "endpoint_url": _text,
    "address": _text, "agent_port": _positive, "wheelhouse": _text, "requirements": _words,
    "index_url": _text,
}


@dataclass(frozen=True)
class Ec2Options:
    """Every option of the ``ec2`` system. ``None`` means "not set": boto3's own configuration
    (profile, ``AWS_*`` variables, the profile's region) or the documented default applies.

    ``alternatives`` lists other instance types and/or subnets (``subnet-...``) to try, in
    order, when the first choice has no capacity. ``from_env`` reads ``BIGEXEC_EC2_<NAME>``
    (upper case), keywords overriding (a keyword or variable that is None or empty counts as
    not set): lists are comma-separated, ``tags`` is ``k=v,k2=v2``, ``spot_only`` is 1/0,
    true/false, yes/no or on/off, ``root_volume_gib`` and ``procs_per_instance`` are positive
    integers, the rest is text as given.
    """

    instance_type: str = "c6i.xlarge"
    region: str | None = None
    market: str = "spot"
    spot_only: bool = False
    alternatives: tuple[str, ...] = ()
    subnet: str | None = None
    security_groups: tuple[str, ...] = ()
    instance_profile: str | None = None
    key_name: str | None = None
    root_volume_gib: int = 30
    ami: str | None = None
    procs_per_instance: int | None = None
    tags: Mapping[str, str] = field(default_factory=dict)
    endpoint_url: str | None = None
    #: Which of an instance's addresses the driver dials: "private", "public", or "auto"
    #: (the public one when the instance has one, else the private one).
    address: str = "auto"
    #: The agent serves on this port; an instance's machines on the ports after it.
    agent_port: int = 7100
    #: Where instances install from with no package index: a directory on the instance or
    #: an http(s) URL of a tar archive of wheels (``Wheelhouse``). None: the package index.
    wheelhouse: str | None = None
    #: More distributions to install next to bigexec; a bare name gets the driver's version.
    requirements: tuple[str, ...] = ()
    #: The package index instances install from (None: pip's default, PyPI).
    index_url: str | None = None

    def __post_init__(self) -> None:
        if self.market not in ("spot", "on-demand"):
            raise ValueError(f"market must be 'spot' or 'on-demand', not {self.market!r}")
        if not self.instance_type:
            raise ValueError("instance_type must not be empty")
        if self.address not in ("auto", "private", "public"):
            raise ValueError(f"address must be 'auto', 'private' or 'public', not "
                             f"{self.address!r}")
        if not (isinstance(self.agent_port, int) and 0 < self.agent_port < 65000):
            raise ValueError(f"agent_port must be a port number below 65000, not "
                             f"{self.agent_port!r}")
        for name in ("root_volume_gib", "procs_per_instance"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value <= 0):
                raise ValueError(f"{name} must be a positive integer, not {value!r}")
        for name in ("alternatives", "security_groups", "requirements"):
            value = getattr(self, name)
            if isinstance(value, str):
                raise ValueError(f"{name} must be a sequence of strings, not one string")
            object.__setattr__(self, name, tuple(value))
        object.__setattr__(self, "tags", dict(self.tags))

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, config: ConfigSource = None,
                 **options: Any) -> Ec2Options:
        """The options from keyword arguments over ``BIGEXEC_EC2_<NAME>`` variables over the
        config file's ``[ec2]`` table (precedence: see ``bigexec.config``). ``config`` None
        reads the default file (found through ``environ``); a path reads that file, a mapping
        is a parsed one. A bad variable raises ValueError naming it; a bad file entry raises
        ``bigexec.config.ConfigError`` (a ValueError) naming the file, table and key."""
        environ = os.environ if environ is None else environ
        known = {f.name for f in fields(cls)}
        unknown = set(options) - known
        if unknown:
            raise TypeError(f"unknown ec2 option(s): {', '.join(sorted(unknown))}")
        loaded = load_config(config, environ)
        # An option's TOML type follows from how its variable's text is read, so that a new
        # option cannot be left out of the file.
        toml_types: dict[Callable[[str], Any], Any] = {
            _text: str, _words: list[str], _flag: bool, _positive: int,
            _tag_pairs: dict[str, str]}
        from_file = loaded.section("ec2", {name: toml_types[conversion]
                                           for name, conversion in _CONVERSIONS.items()})
        values: dict[str, Any] = {}
        for name in sorted(known):
            variable = ENV_PREFIX + name.upper()
            if options.get(name) is not None:  # None: not set by the caller
                values[name] = options[name]
            elif environ.get(variable, "").strip():  # an empty variable is not set either
                try:
                    values[name] = _CONVERSIONS[name](environ[variable])
                    cls(**{name: values[name]})  # what the dataclass refuses names it too
                except ValueError as exc:
                    raise ValueError(f"{variable}={environ[variable]!r}: {exc}") from None
            elif name in from_file:
                values[name] = from_file[name]
                try:
                    cls(**{name: values[name]})
                except ValueError as exc:
                    raise loaded.error("ec2", name, str(exc)) from None
        return cls(**values)

    def candidates(self) -> list[tuple[str, str | None]]:
        """(instance type, subnet) pairs in the order they are tried."""
        types = [self.instance_type] + [a for a in self.alternatives
                                        if not a.startswith("subnet-")]
        subnets = [self.subnet] + [a for a in self.alternatives if a.startswith("subnet-")]
        return [(t, s) for t in types for s in subnets]
