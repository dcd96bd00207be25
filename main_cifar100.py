"""Train, evaluate or describe a CNN on CIFAR-100:  python main_cifar100.py --model cnn_resnet34

Every flag is shared with main_cifar10.py; see `python main_cifar100.py --help` and README.md.
"""
import sys

from train import main

if __name__ == "__main__":
    sys.exit(main("cifar100"))
