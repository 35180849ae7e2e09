"""Pre-training the pool's tiny Gemma-2 models: size ladder, loop with resume, pool kinds, context use."""
