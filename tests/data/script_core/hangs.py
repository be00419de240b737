"""Never reaches an optimizer step: it waits (for a lock, a server, ...) forever."""
import time

time.sleep(600)
