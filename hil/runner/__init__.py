"""kiln-runner: the C++ program that runs a model.so on a board, and its build."""
