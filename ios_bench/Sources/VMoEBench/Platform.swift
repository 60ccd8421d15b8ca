import Darwin
import Foundation

/// Facts about the device: model, OS, chip, thermal state and memory footprint.
public enum Platform {
    static func sysctlString(_ name: String) -> String? {
        var size = 0
        guard sysctlbyname(name, nil, &size, nil, 0) == 0, size > 0 else { return nil }
        var buffer = [CChar](repeating: 0, count: size)
        guard sysctlbyname(name, &buffer, &size, nil, 0) == 0 else { return nil }
        return String(cString: buffer)
    }

    public static func device() -> Device {
        let v = ProcessInfo.processInfo.operatingSystemVersion
        #if os(iOS)
            let os = "iOS"
            let model = sysctlString("hw.machine") ?? "iPhone"  // e.g. "iPhone16,1"
            let chip: String? = nil  // iOS exposes no chip name; the model identifier implies it
        #else
            let os = "macOS"
            let model = sysctlString("hw.model") ?? "Mac"  // e.g. "Mac14,2"
            let chip = sysctlString("machdep.cpu.brand_string")  // e.g. "Apple M2"
        #endif
        return Device(
            model: model,
            os: os,
            osVersion: "\(v.majorVersion).\(v.minorVersion).\(v.patchVersion)",
            chip: chip,
            cpuCount: ProcessInfo.processInfo.activeProcessorCount
        )
    }

    public static func osVersion() -> String {
        let v = ProcessInfo.processInfo.operatingSystemVersion
        return "\(v.majorVersion).\(v.minorVersion).\(v.patchVersion)"
    }

    public static func thermal() -> Thermal {
        let state: String
        switch ProcessInfo.processInfo.thermalState {
        case .nominal: state = "nominal"
        case .fair: state = "fair"
        case .serious: state = "serious"
        case .critical: state = "critical"
        @unknown default: state = "unknown"
        }
        return Thermal(state: state, zonesCelsius: nil)
    }

    /// (current phys_footprint, peak phys_footprint since the process started) from task_info(TASK_VM_INFO);
    /// phys_footprint is the number Xcode's memory gauge and jetsam use.
    public static func physFootprint() -> (current: Int, peak: Int)? {
        var info = task_vm_info_data_t()
        var count = mach_msg_type_number_t(MemoryLayout<task_vm_info_data_t>.size / MemoryLayout<integer_t>.size)
        let kr = withUnsafeMutablePointer(to: &info) {
            $0.withMemoryRebound(to: integer_t.self, capacity: Int(count)) {
                task_info(mach_task_self_, task_flavor_t(TASK_VM_INFO), $0, &count)
            }
        }
        guard kr == KERN_SUCCESS else { return nil }
        return (Int(info.phys_footprint), Int(info.ledger_phys_footprint_peak))
    }
}
