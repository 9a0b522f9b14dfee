"""Folding a short run's reports into one: the worker's half of protocol 9.

An agent that starts and ends between two flushes of the worker's reports (most one-shot agents)
reported STARTED, READY and TERMINATED as three items of one ``agent_events`` frame, which the
coordinator decoded, checked and looked up three times.  When they go in one report anyway, its
end alone says it all: ``reached`` already tells whether it got to READY, and ``folded`` tells the
coordinator to say STARTED (and READY) first, as reported, not as ``recovered``.

Only a run whose reports in the batch are exactly STARTED, (READY,) TERMINATED, the first two
without fields, is folded; anything else of it (an AGENT_ERROR between, say) keeps every item as
it is, so what the coordinator publishes and in which order does not change.
"""

from __future__ import annotations

from typing import Any

STARTED, READY, TERMINATED = "AGENT_STARTED", "AGENT_READY", "AGENT_TERMINATED"

#: one report as the supervisor gives it: (agent, run, epoch, event, fields)
Report = tuple[str, str, int, str, dict[str, Any]]


def fold(reports: list[Report]) -> list[Report]:
    """``reports`` in order, each run that went from STARTED to its end within them as its end
    alone, marked ``folded``.  The order of everything else is kept."""
    if len(reports) == 3:
        # the usual batch, one short run's three reports alone, told at a glance: the loop below
        # spent ~30 Python lines on it, the largest single piece of a worker's flush in S2
        started, ready, ended = reports
        if (started[3] == STARTED and ready[3] == READY and ended[3] == TERMINATED and not started[4]
                and not ready[4] and started[:3] == ready[:3] == ended[:3] and ended[4].get("reached") == "READY"):
            ended[4]["folded"] = True
            return [ended]
    said: dict[tuple[str, str, int], list[int]] = {}  # a run -> where its STARTED (and READY) are
    folded: list[int] = []
    for i, (name, run, epoch, event, fields) in enumerate(reports):
        copy = (name, run, epoch)
        if event == STARTED:
            if not fields:
                said[copy] = [i]
            continue
        before = said.pop(copy, None)
        if before is None:
            continue
        if event == READY and not fields and len(before) == 1:
            before.append(i)
            said[copy] = before
        elif event == TERMINATED and fields.get("reached") == ("READY" if len(before) == 2 else "STARTED"):
            fields["folded"] = True  # the end's own dict (the supervisor's report made it)
            folded += before
    if not folded:
        return reports
    gone = set(folded)
    return [report for i, report in enumerate(reports) if i not in gone]
