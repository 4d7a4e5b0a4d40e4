"""Serving above the pipeline: a scheduler that owns one pipeline's B slots."""
from .scheduler import MODES, QueueFull, Scheduler, SchedulerClosed, ServeResult

__all__ = ["MODES", "QueueFull", "Scheduler", "SchedulerClosed", "ServeResult"]
