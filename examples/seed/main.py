"""The seed example: two agents, run by the orchestrator.

    python examples/seed/main.py                          # embedded: starts a local worker itself
    python examples/seed/main.py tcp://127.0.0.1:5555     # waits for 2 pyorchestrate-worker processes

Workers need not have my_project installed: its code is shipped with the agents.
"""

import sys

from pyorchestrate import Orchestrator
from my_project.models import Publisher, Subscriber

if __name__ == "__main__":
    address = sys.argv[1] if len(sys.argv) > 1 else None
    config = Orchestrator.Config(address=address, min_workers=2) if address else Orchestrator.Config()
    orchestrator = Orchestrator("Orchestrator", config=config)

    orchestrator.register_agent(Publisher, "Publisher")
    orchestrator.register_agent(Subscriber, "Subscriber")

    orchestrator.start()
    orchestrator.join()
