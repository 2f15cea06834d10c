"""Training routines: each a plugin attaching ``compute_loss`` / ``train_step``."""
