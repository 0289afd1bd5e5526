"""Hardware-in-the-loop: protocols <- transports <- deploy/validate/report (labgrid's layers)."""
