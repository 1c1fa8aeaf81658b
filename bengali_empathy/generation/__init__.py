"""Generation: batched generation, the compiled decoder, merged weights, chat."""
