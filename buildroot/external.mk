# Package recipes of the mongarsd external tree.
include $(sort $(wildcard $(BR2_EXTERNAL_MONGARSD_PATH)/package/*/*.mk))
