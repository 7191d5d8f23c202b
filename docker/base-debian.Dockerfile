# A stand-in for python:3.11-slim-bookworm made from Debian packages alone, for
# builds that cannot reach Docker Hub (an air gap, a proxy that allows only package
# mirrors). Debian bookworm's python3 is 3.11, like the official image's.
#
# 1. A root file system from a Debian mirror (or your local mirror), imported as an image:
#      debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
#          bookworm rootfs http://deb.debian.org/debian
#      tar -C rootfs -c . | docker import - scanqueue-rootfs:bookworm
# 2. This file (no build context needed, nothing is downloaded):
#      docker build -t scanqueue-base:bookworm - < docker/base-debian.Dockerfile
# 3. The image on top of it:
#      docker build --build-arg BASE_IMAGE=scanqueue-base:bookworm -f docker/Dockerfile .
#
# scripts/test-docker.sh does all three (and caches step 1 per day).
ARG ROOTFS_IMAGE=scanqueue-rootfs:bookworm
FROM ${ROOTFS_IMAGE}

# `docker import` keeps no configuration: set what the official image sets.
ENV LANG=C.UTF-8 \
    PATH=/usr/local/bin:/usr/local/sbin:/usr/sbin:/usr/bin:/sbin:/bin

# Like the official image, `python` and `pip` live in /usr/local and may install
# packages: a virtual environment there (Debian's own python3 refuses `pip install`
# into the system, PEP 668). pip comes from the wheel python3-venv ships: offline.
RUN python3 -m venv /usr/local \
    && python --version \
    && pip --version

CMD ["python3"]
