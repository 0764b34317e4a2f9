"""What the Trainer is handed besides model and data: checkpoint I/O, resume, the run log and folders, speed and
thread policy, and the table of settings kinds."""
