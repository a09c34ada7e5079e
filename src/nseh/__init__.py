"""nseh: live migration of VMs together with their network security context."""
