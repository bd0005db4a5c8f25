"""HTTP layer: schemas of the hosted API, OpenAI-shaped errors, auth, image decoding."""
