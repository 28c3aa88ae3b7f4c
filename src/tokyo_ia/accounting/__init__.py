"""Usage → cost. Budgets, the spend ledger writer and reports join this package later."""

from .pricing import FREE, Price, PriceSettings, PriceTable, shipped_prices, usage_cost

__all__ = ["FREE", "Price", "PriceSettings", "PriceTable", "shipped_prices", "usage_cost"]
