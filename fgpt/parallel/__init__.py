"""Training strategies: how the same pure `forward` is spread over processes.

Each strategy implements `fgpt.parallel.base.Strategy`; `make_strategy` picks one by name.
"""

from fgpt.parallel.base import STRATEGIES, Strategy, make_strategy

__all__ = ["STRATEGIES", "Strategy", "make_strategy"]
