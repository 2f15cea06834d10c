"""The demo recipe's data and model (sklearn digits, runs on a laptop CPU)."""
