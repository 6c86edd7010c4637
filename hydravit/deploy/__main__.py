"""``python -m hydravit.deploy COMMAND ...``: one entry point for the deployment tools."""
import argparse
import importlib
import sys
from typing import Optional, Sequence

COMMANDS = {  # command: (module, what it does)
    'profile': ('profile', 'measure every k on this device (accuracy, latency, throughput, GMACs, memory) -> JSON'),
    'pick': ('pick', 'the most accurate k within latency / GMACs / memory / throughput / top-1 bounds'),
    'export': ('export_cli', 'write a k-head subnetwork as a plain timm ViT or a checked ONNX file'),
    'serve-bench': ('serve_bench', 'fixed k vs the ElasticRunner on a stream under a background CPU load'),
}


def main(argv: Optional[Sequence[str]] = None) -> object:
    parser = argparse.ArgumentParser(
        allow_abbrev=False, prog='python -m hydravit.deploy', formatter_class=argparse.RawDescriptionHelpFormatter,
        description='Deployment tools; `python -m hydravit.deploy COMMAND --help` for the flags of each.',
        epilog='\n'.join(f'  {name:12s} {what}' for name, (_, what) in COMMANDS.items()))
    parser.add_argument('command', choices=tuple(COMMANDS), metavar='COMMAND', help=', '.join(COMMANDS))
    parser.add_argument('args', nargs=argparse.REMAINDER, help='the command\'s own arguments')
    args = parser.parse_args(sys.argv[1:] if argv is None else list(argv))
    module = importlib.import_module(f'hydravit.deploy.{COMMANDS[args.command][0]}')
    return module.main(args.args)


if __name__ == '__main__':
    main()
