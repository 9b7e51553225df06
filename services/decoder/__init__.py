"""The decoder: the model, a continuous-batching engine, and the GenerationService over it."""
