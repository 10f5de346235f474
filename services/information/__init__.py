"""Information service: budgets, exact reservations, usage and cost, metrics and alerts."""
