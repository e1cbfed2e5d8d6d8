"""What pyproject.toml cannot say to every setuptools that builds elemta: the man pages (no
data files in [project]) and the licence (bookworm's setuptools 66 takes only the table form,
which newer releases refuse).  The rest is in pyproject.toml, which setuptools reads here too,
so `python3 setup.py ...`, Debian's pybuild and `pip install .` build the same package."""

from setuptools import setup

setup(
    license="MIT",
    data_files=[("share/man/man8", ["man/elemta.8", "man/elemtactl.8", "man/elemta-sendmail.8"]),
                ("share/man/man5", ["man/elemta.toml.5"])],
)
