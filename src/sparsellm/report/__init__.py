"""Human-readable reports (Markdown tables) from run results."""
