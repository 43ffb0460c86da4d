"""The box's own sections: [appliance] (its name, state folder and logging), [spool],
[pack], [encryption], [queue] and [health]: their dataclasses and parsers.

Each parser reads its table with `base._Table` and records problems (a range, keys that
contradict each other) in the context rather than raising; `tree.parse` calls them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from appliance.core.config.base import _NAME_RE, _check_path_list, _Table


@dataclass(frozen=True)
class Spool:
    key_file: Path = Path("/etc/appliance/keys/spool.key")
    reserve_free_mb: int = 2048


# pack.during_burst: what is packed while a scanner sends a burst (pack.policy.may_pack_now)
DURING_BURST = ("link-waits", "first", "always", "never")


@dataclass(frozen=True)
class Pack:
    codec: str = "jpeg2000"
    adaptive: bool = True  # a faster codec when the link would wait for the packer (pack.pace)
    verify: bool = True
    study_quiet_s: float = 10.0
    segment_max_instances: int = 100
    first_segment_instances: int = 16  # a study's first segment: on the link within ~1 s
    segment_max_mb: int = 64
    segment_max_age_s: float = 10.0
    stat_segment_max_age_s: float = 2.0  # a stat study's segment is sealed this often
    during_burst: str = "never"  # what is packed while a scanner sends (pack.policy)
    workers: int = 0  # 0 = one per CPU
    stream_threshold_mb: int = 64  # instances this large are packed streaming (bounded memory)
    job_timeout_s: float = 60.0  # a codec job running longer is killed (its instance sent as is)
    job_timeout_s_per_mb: float = 1.0  # ...plus this much per MB of the instance


@dataclass(frozen=True)
class Encryption:
    appliance_key: Path = Path("/etc/appliance/keys/appliance.key")
    appliance_public_key: Path = Path("/etc/appliance/keys/appliance.pub")
    recipients: tuple[Path, ...] = ()


@dataclass(frozen=True)
class Queue:
    retry_min_s: float = 5.0
    retry_max_s: float = 600.0
    keep_delivered_h: float = 24.0
    lanes: int = 2  # bundles sent at once (plus one lane kept for stat studies)
    min_rate_kbit_s: float = 256.0  # an attempt slower than this is cancelled
    down_after: int = 3  # consecutive destination failures that mark it down (forward.failover)
    probe_min_s: float = 5.0  # a down destination is probed after this, doubling ...
    probe_max_s: float = 60.0  # ... up to this


@dataclass(frozen=True)
class Health:
    stall_s: float = 120.0  # a stage working this long without progress is stuck


@dataclass(frozen=True)
class Appliance:
    name: str = "appliance"
    state_dir: Path = Path("/var/lib/appliance")
    log_level: str = "info"
    log_format: str = "auto"  # auto | json | console


def _parse_appliance(t: _Table) -> Appliance:
    d = Appliance()
    a = Appliance(
        name=t.string("name", d.name, max_len=63, pattern=_NAME_RE,
                      hint="must be 1..63 letters, digits, '.', '_' or '-', "
                           "starting with a letter or digit"),
        state_dir=t.path("state_dir", d.state_dir),
        log_level=t.choice("log_level", d.log_level, ("debug", "info", "warning", "error")),
        log_format=t.choice("log_format", d.log_format, ("auto", "json", "console")),
    )
    t.finish()
    return a


def _parse_spool(t: _Table) -> Spool:
    d = Spool()
    s = Spool(key_file=t.path("key_file", d.key_file),
              reserve_free_mb=t.integer("reserve_free_mb", d.reserve_free_mb, 0, 10_000_000))
    t.finish()
    return s


def _parse_pack(t: _Table) -> Pack:
    d = Pack()
    p = Pack(
        codec=t.choice("codec", d.codec, ("jpeg2000", "jpeg-ls", "none")),
        adaptive=t.boolean("adaptive", d.adaptive),
        verify=t.boolean("verify", d.verify),
        study_quiet_s=t.number("study_quiet_s", d.study_quiet_s, 0.5, 3600),
        segment_max_instances=t.integer("segment_max_instances", d.segment_max_instances,
                                        1, 100_000),
        first_segment_instances=t.integer("first_segment_instances", d.first_segment_instances,
                                          1, 100_000),
        segment_max_mb=t.integer("segment_max_mb", d.segment_max_mb, 1, 16_384),
        segment_max_age_s=t.number("segment_max_age_s", d.segment_max_age_s, 0.5, 3600),
        stat_segment_max_age_s=t.number("stat_segment_max_age_s", d.stat_segment_max_age_s,
                                        0.5, 3600),
        during_burst=t.choice("during_burst", d.during_burst, DURING_BURST),
        workers=t.integer("workers", d.workers, 0, 256),
        stream_threshold_mb=t.integer("stream_threshold_mb", d.stream_threshold_mb, 1, 65_536),
        job_timeout_s=t.number("job_timeout_s", d.job_timeout_s, 1, 86_400),
        job_timeout_s_per_mb=t.number("job_timeout_s_per_mb", d.job_timeout_s_per_mb, 0, 3600),
    )
    t.finish()
    return p


def _parse_encryption(t: _Table) -> Encryption:
    d = Encryption()
    e = Encryption(
        appliance_key=t.path("appliance_key", d.appliance_key),
        appliance_public_key=t.path("appliance_public_key", d.appliance_public_key),
        recipients=t.get("recipients", d.recipients, _check_path_list(t.ctx)),
    )
    t.finish()
    return e


def _parse_queue(t: _Table) -> Queue:
    d = Queue()
    q = Queue(
        retry_min_s=t.number("retry_min_s", d.retry_min_s, 0.1, 86400),
        retry_max_s=t.number("retry_max_s", d.retry_max_s, 1, 7 * 86400),
        keep_delivered_h=t.number("keep_delivered_h", d.keep_delivered_h, 0, 24 * 365),
        lanes=t.integer("lanes", d.lanes, 1, 8),
        min_rate_kbit_s=t.number("min_rate_kbit_s", d.min_rate_kbit_s, 8, 10_000_000),
        down_after=t.integer("down_after", d.down_after, 1, 100),
        probe_min_s=t.number("probe_min_s", d.probe_min_s, 0.1, 3600),
        probe_max_s=t.number("probe_max_s", d.probe_max_s, 1, 86400),
    )
    t.finish()
    if q.retry_min_s > q.retry_max_s:
        t.ctx.problem(t.key("retry_min_s"), "must not be greater than queue.retry_max_s")
    if q.probe_min_s > q.probe_max_s:
        t.ctx.problem(t.key("probe_min_s"), "must not be greater than queue.probe_max_s")
    return q


def _parse_health(t: _Table) -> Health:
    d = Health()
    h = Health(stall_s=t.number("stall_s", d.stall_s, 5, 3600))
    t.finish()
    return h
