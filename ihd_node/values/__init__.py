"""Typed values handed from one stage to the next (no stage code, no torch)."""
