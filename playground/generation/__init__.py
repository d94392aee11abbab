"""Generation, below the manager: the events every backend yields (`events`), who runs when (`scheduling`: handles,
the FIFO gate, the device worker threads), and the two ways a reply is produced: a local model (`local`) and a
remote OpenAI-compatible engine (`remote`)."""
