"""Declarative automation: what runs on its own once a shard is ingested, and when statistics refresh."""

import dagster as dg

from curation_platform_dagster.defs.sources import EXTERNAL

STATISTICS_CRON = "0 * * * *"


def per_shard() -> dg.AutomationCondition:
    """A shard's partition follows its upstream partitions (and a new teacher), once their blocking checks pass."""
    return dg.AutomationCondition.eager() & dg.AutomationCondition.all_deps_blocking_checks_passed()


def once_available() -> dg.AutomationCondition:
    """A global artefact is made once its inputs exist, then only on request (it pins every shard's scores).

    External inputs are never recorded by Dagster: counted as missing, they would hold it back forever.
    """
    return dg.AutomationCondition.on_missing().ignore(EXTERNAL)


def on_statistics_cron() -> dg.AutomationCondition:
    """Pool statistics refresh at the first cron tick after some shard's scores changed.

    Unlike ``on_cron`` this never waits for every shard (or the reference) to be updated since the
    tick, so one failed shard does not hold the pool's statistics back.
    """
    tick = dg.AutomationCondition.cron_tick_passed(STATISTICS_CRON).since_last_handled()
    changed = dg.AutomationCondition.any_deps_updated().since_last_handled()
    return (tick & changed & ~dg.AutomationCondition.any_deps_in_progress()
            & ~dg.AutomationCondition.in_progress()).with_label("on_statistics_cron")
