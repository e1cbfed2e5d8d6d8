from setuptools import find_packages, setup

from elemta import __version__

setup(
    name="elemta",
    version=__version__,
    description="A mail transfer agent with a durable SQLite queue",
    license="MIT",
    python_requires=">=3.11",
    packages=find_packages(include=["elemta", "elemta.*"]),
    install_requires=["dnspython>=2.3", "idna>=3.3", "click>=8.1", "rich>=13.3", "pyspf>=2.0.14", "dkimpy>=1.1.4", "pynacl>=1.5", "cryptography>=38"],
    extras_require={"test": ["pytest>=7.2", "aiosmtpd>=1.4", "dnslib>=0.9", "trustme>=0.9"]},
    entry_points={
        "console_scripts": ["elemta = elemta.cli.elemta:main", "elemtactl = elemta.cli.elemtactl:main",
                            "elemta-sendmail = elemta.cli.sendmail:main"],
    },
    data_files=[("share/man/man8", ["man/elemta.8", "man/elemtactl.8"]), ("share/man/man5", ["man/elemta.toml.5"])],
)
