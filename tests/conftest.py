"""Fixtures shared by several test files."""
import pytest


@pytest.fixture
def fresh_accelerate_state():
    """accelerate keeps process-wide singletons; reset them around a test that builds an Accelerator."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    yield
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
