"""Train, evaluate or describe a CNN on CIFAR-10:  python main_cifar10.py --model cnn_resnet18

Every flag is shared with main_cifar100.py; see `python main_cifar10.py --help` and README.md.
"""
import sys

from train import main

if __name__ == "__main__":
    sys.exit(main("cifar10"))
