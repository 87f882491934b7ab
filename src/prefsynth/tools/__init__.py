"""Commands that read a config or an output without running it: status, estimate, report."""
