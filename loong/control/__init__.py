"""Loong's internal manager-instance control protocol (see proto/loong/control/v1/)."""
