"""Pure tensor maths of compression: masks, magnitude, Wanda, SparseGPT. Imports only torch."""
