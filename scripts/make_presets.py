"""Regenerate src/promptalign/presets/*.yaml from the methods' published configs."""

from promptalign.config import dump_yaml
from promptalign.methods import list_methods
from promptalign.presets import PROTOCOLS, make_preset, preset_dir


def main() -> None:
    for method in list_methods():
        for protocol in PROTOCOLS:
            path = preset_dir() / f"{method}-{protocol}.yaml"
            path.write_text(
                f"# {method}, {protocol} protocol: published settings (optim nulls = the "
                f"method's preset, epochs by shots)\n" + dump_yaml(make_preset(method, protocol))
            )
            print(path)


if __name__ == "__main__":
    main()
