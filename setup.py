"""Everything is in pyproject.toml but one file: the wheel's top-level `prefmill-torch-builds.pth` (see
prefmill/_torch_builds.py), which setuptools has no pyproject setting for."""

from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

PTH = "prefmill-torch-builds.pth"


class BuildWithPth(build_py):
    """build_py that also puts the .pth at the root of the build (the wheel's site-packages level)."""

    def run(self) -> None:
        super().run()
        self.copy_file(str(Path("prefmill") / PTH), str(Path(self.build_lib) / PTH))

    def get_outputs(self, include_bytecode: bool = True) -> list[str]:
        return [*super().get_outputs(include_bytecode), str(Path(self.build_lib) / PTH)]


setup(cmdclass={"build_py": BuildWithPth})
