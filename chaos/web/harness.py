"""Everything :mod:`chaos.web` takes from the rest of :mod:`chaos`, in one place.

The page shows what the harness already computes — fault spans, flagged
messages, journeys and their HTML view, the scenario vocabulary — and never
computes its own version of them.  Only this module names their modules, so
when they move only these imports change.
"""

from __future__ import annotations

from chaos.report.flagged import Journeys, build_journeys, flagged_messages
from chaos.report.model import LOST, REPORT_NAME, FaultSpan, fault_spans, message_outcomes
from chaos.scenario import NEMESES
from chaos.trace.view import JOURNEY_CSS, render_html_body

__all__ = ["LOST", "REPORT_NAME", "FaultSpan", "fault_spans", "message_outcomes", "Journeys", "build_journeys",
           "flagged_messages", "NEMESES", "JOURNEY_CSS", "render_html_body", "family_of"]


def family_of(kind: str) -> str:
    """The nemesis family of a fault kind (``partition``, ``link``, ``process``, ...); ``other`` if unknown."""
    entry = NEMESES.get(kind)
    return entry[0] if entry else "other"
