"""The provider services of the mesh, one package per API."""
