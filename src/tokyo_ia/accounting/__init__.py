"""Usage → cost (pricing), the spend ledger writer (ledger) and its reports (spend, spend_cli).

Only pricing is re-exported: config.py imports this package, and the ledger pulls in the store.
Budgets join this package later.
"""

from .pricing import FREE, Price, PriceSettings, PriceTable, shipped_prices, usage_cost

__all__ = ["FREE", "Price", "PriceSettings", "PriceTable", "shipped_prices", "usage_cost"]
