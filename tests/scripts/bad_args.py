"""A script with a required argument: without it argparse exits with status 2."""
import argparse

parser = argparse.ArgumentParser()
parser.add_argument("--data", required=True)
parser.parse_args()
