"""A script that fails after building its model."""
import torch


def load_data(path):
    raise FileNotFoundError(f"no dataset at {path}")


model = torch.nn.Linear(4, 4)
data = load_data("/nonexistent/data.npz")
