"""The ``ec2`` system: machines on EC2 instances (``bigexec.start("ec2")``). Its AWS side
(options, launching, tags, leases, user-data, sweeping, noticing dead instances) goes through
boto3, imported only when an API is first used, so ``import bigexec`` never needs it
(``pip install bigexec[ec2]``). One module per job: ``options``, ``instances``,
``user_data``, ``monitor``, ``instance`` (an instance's agent and the machines on it, as the
driver sees them) and ``system``, which joins them with the instances' agents
(``bigexec.agent``); its docstring has the picture of a boot.

What runs where::

    driver                                           EC2
    ──────                                           ───
    Ec2Options (keywords over BIGEXEC_EC2_*)
    Ec2Instances.launch(session, machines,
      user_data, lease_until)  ── RunInstances ──>   ceil(machines / procs_per_instance)
        spot first; capacity errors: the next          instances, tagged at launch, IMDSv2
        alternative; then on-demand unless             required, shutdown = terminate
        spot_only; throttling: jittered backoff
        under one deadline
    renew_lease(ids, until)   ── CreateTags ────>    bigexec-lease-until = epoch seconds
    DeadInstanceMonitor.suspect(id): batched, at most one DescribeInstances per interval
    terminate(ids) at shutdown; sweep() from anywhere: every instance of a session whose
    newest lease tag lies in the past is terminated

The lease tag: ``bigexec-lease-until`` holds the end of the driver's lease as whole epoch
seconds (UTC). The driver sets it at launch and renews it on all its instances while it lives
(one CreateTags call for up to 1,000 instances); the agent on each instance enforces the same
lease by powering off. ``sweep`` is for what both missed (a driver killed before its agents
came up, an agent that never started): it treats a session as lapsed when the newest
``bigexec-lease-until`` among its live instances is older than ``now - grace``; an instance of
bigexec's with no readable lease tag counts as lapsed once it is an hour old.

User-data: ``render_user_data`` writes a ``#cloud-config`` document that puts the agent's
bootstrap document at ``/run/bigexec/agent.json`` (mode 0600) and runs the install, then
``python3 -m bigexec.agent --bootstrap /run/bigexec/agent.json`` from the new environment.
EC2 limits user-data to 16 KB (16,384 bytes) in raw form, before base64 (Amazon EC2 User
Guide, "Work with instance user data"); boto3 base64-encodes it itself, so the raw bytes are
what is checked: gzip (which cloud-init reads) is used only when the plain text does not fit.
"""

from __future__ import annotations

from .instances import (
    CAPACITY_ERRORS,
    DEAD_STATES,
    LEASE_TAG,
    Ec2CapacityError,
    Ec2Instances,
    Ec2Throttled,
    InstanceRecord,
)
from .monitor import DeadInstanceMonitor
from .options import DEFAULT_AMI_PARAMETER, ENV_PREFIX, Ec2Options, default_ami_parameter
from .system import Ec2Machine, Ec2System
from .user_data import (
    AGENT_DOCUMENT_PATH,
    USER_DATA_LIMIT,
    InstallPlan,
    PinnedRequirements,
    Wheelhouse,
    render_user_data,
)

__all__ = ["AGENT_DOCUMENT_PATH", "CAPACITY_ERRORS", "DEAD_STATES", "DEFAULT_AMI_PARAMETER",
           "ENV_PREFIX", "LEASE_TAG", "USER_DATA_LIMIT", "DeadInstanceMonitor",
           "Ec2CapacityError", "Ec2Instances", "Ec2Machine", "Ec2Options", "Ec2System",
           "Ec2Throttled", "InstallPlan", "InstanceRecord", "PinnedRequirements", "Wheelhouse",
           "default_ami_parameter", "render_user_data"]
