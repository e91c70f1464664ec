"""Scenarios as files: load one (`load`), run it under a policy (`run`), compare.

    sc = emu.scenario.load("scenarios/initial-vs-eventual.toml")   # or a library name
    out = emu.scenario.run(sc, policy="eventual")
    out["host_unmapped"], out["signals"], out["expect"]["ok"]
"""
from __future__ import annotations

from .outcome import ROWS, rows
from .runner import run
from .spec import Scenario, ScenarioError, library, load, loads

__all__ = ["ROWS", "Scenario", "ScenarioError", "library", "load", "loads", "rows", "run"]
